"""lorabake: a Makefile for LoRA artifacts."""

__version__ = "0.1.0"
