"""Run machinery: settings and their rules, checkpoints, resume state, torchrun, one-line errors."""
