"""Evaluation beyond RecBole's evaluator: per-user metrics and the statistics of comparisons."""
