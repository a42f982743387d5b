"""The frozen side: what a tower is, its encoder, and which hidden states it keeps (no RecBole)."""
