"""Training: `plan` does kohya's step arithmetic, `loop` trains."""
