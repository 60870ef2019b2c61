"""autotune: hardware-aware configuration autotuner for llama.cpp inference."""

__version__ = "0.1.0"
