"""Analytic memory model: what a configuration needs per device, predicted without loading the engine.

Everything follows the rules of the vendored llama.cpp (0.3.36), read from its source:

* weights: whole tensors placed by llama.cpp's layer rule (input layer on the host, the last
  ``n_gpu_layers - 1`` repeating layers plus the output layer on the GPUs); with mmap the host part is
  the mapped file range of its tensors, and quantized matrices with a repacked CPU layout get a second
  copy in the ``CPU_REPACK`` buffer (ggml-cpu/repack.cpp decides which);
* KV cache: ``n_head_kv * head_dim`` elements per layer and cell at the cache type's row size, cells
  padded to 256, sliding-window layers in their own, smaller cache unless ``swa_full``;
* compute buffer: the engine's reserve graph is rebuilt tensor by tensor (same ops, shapes, order) and
  replayed through a copy of ggml-alloc's allocator, so flash attention, n_ubatch and the context
  change it exactly as they change the engine's;
* output buffer: logits of one sequence (n_vocab floats).

Only architectures whose graph was checked against the engine's dry run are accepted; anything else
raises ModelError saying "unsupported architecture" rather than printing a number we cannot back.
The GPU split (layer placement, per-GPU KV and compute) follows the same source rules but has not been
checked against a real GPU engine.
"""

from .estimate import (
           SUPPORTED_ARCHS,
           cache_pairs,
           check_supported,
           ctx_sweep,
           estimate,
           max_ctx,
           validate,
)
from .layout import (
           GIB,
           GPU_OVERHEAD,
           HOST,
           HOST_OVERHEAD,
           MARGIN_MIN,
           MIB,
           DeviceMemory,
           KVCache,
           MemoryEstimate,
           margin,
           pad,
           placement,
)
from .oracle import COMPONENTS, as_logged, error_pct, summarize, verify

__all__ = ["COMPONENTS", "GIB", "GPU_OVERHEAD", "HOST", "HOST_OVERHEAD", "MARGIN_MIN", "MIB", "SUPPORTED_ARCHS",
           "DeviceMemory", "KVCache", "MemoryEstimate", "as_logged", "cache_pairs", "check_supported", "ctx_sweep",
           "error_pct", "estimate", "margin", "max_ctx", "pad", "placement", "summarize", "validate", "verify"]
