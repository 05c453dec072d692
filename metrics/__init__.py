"""Explanation metrics: pure functions over tensors (maps, masks, words), and the scoring of eval_metrics.py."""
