"""lorabake: a Makefile for LoRA artifacts."""
import logging

__version__ = "0.1.0"


class _DropKernelsNotice(logging.Filter):
    """lycoris imports bitsandbytes (for its quantized layers) whatever the run trains, and on CPUs
    with AVX512-BF16 bitsandbytes logs that it could not fetch an optional kernel from the Hub
    ("Failed to load CPU gemm_4bit_forward from kernels-community"). lorabake uses no 4-bit layer
    and downloads nothing, so that one notice would only open every job log with a false alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsNotice())
