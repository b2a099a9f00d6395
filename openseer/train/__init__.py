"""Training loop, LARC + schedule, checkpoints, distributed set-up."""
