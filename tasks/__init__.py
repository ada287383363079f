"""Floor 1: backend-neutral work for the course's jobs: text windows, splits, templates, collation, metrics, the
learning-rate schedule and the training loop, which drives either backend through ``tasks.training.Backend``."""
