"""Using a trained model: top-k recommendations, new items without retraining, export for serving."""
