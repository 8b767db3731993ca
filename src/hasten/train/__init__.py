"""The trainer: run assembly, the explicit loop, checkpoints, metrics, logging and guards."""
