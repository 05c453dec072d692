"""Pictures of runs and words: galleries, weight heatmaps, training curves, report.md, parts per class."""
