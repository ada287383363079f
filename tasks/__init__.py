"""Floor 2: backend-neutral work for the course's jobs: text windows, splits, templates, collation, metrics, the
learning-rate schedule and the training loop, which drives either engine through the small interface
``tasks.loop.Backend`` and imports neither (they meet in the command and the benchmarks, on floor 3)."""
