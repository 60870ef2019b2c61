"""Memory model: what a configuration needs per device, for any model the engine loads.

Weights are placed from the GGUF tensor table by the rules of the vendored llama.cpp (0.3.36), read from its
source: whole tensors by llama.cpp's layer rule (input layer on the host, the last ``n_gpu_layers - 1``
repeating layers plus the output layer on the GPUs), the experts and dense FFN weights the overrides keep in
host memory (``Settings.experts_on_host``, ``Settings.ffn_on_host``), the mapped file range with mmap, and a second copy in the AMX / CPU_REPACK buffers for the matrices
ggml-cpu repacks (checked against real loads).

KV cache, compute and output buffers come from one of two sources, named in every estimate:

* ``replay``: for the architectures in ``REPLAY_ARCHS`` the reserve graph is rebuilt tensor by tensor and
  replayed through a copy of ggml-alloc's allocator, and the KV cache is computed from the head counts;
  pure Python, a few milliseconds, equal to the engine's dry run;
* ``engine dry run``: any other architecture (mixture of experts, MLA, fused QKV, recurrent state, ...) is
  priced by the engine's own no-allocation dry run in a child process, cached on disk (``dryrun``).

On an engine that offloads to GPUs, the compute and output buffers come from its dry run, per device (CUDA's
graph splits and buffers are the engine's to say), and each GPU adds the overhead measured there
(``autotune.memory.overhead``: the CUDA context, cuBLAS, the memory pool's peak).

The package also owns ``fit`` (the placements that hold a context) and ``overhead`` (what a GPU holds beyond
llama.cpp's buffers, learned from peaks the engine reports). May import the vocabulary and the facts; the engine's
own figures come from the layers above: its dry run through the build a ``Hardware`` names (``Hardware.build``),
the checks against it from ``search.oracle``.
"""

from .describe import describe
from .estimate import (
    DRY_RUN,
    DRY_RUN_PROJECTED,
    REPLAY,
    REPLAY_ARCHS,
    beyond_trained,
    cache_pairs,
    ctx_sweep,
    estimate,
    gpu_engine,
    max_ctx,
    prefetch,
    replay_gap,
    validate,
)
from .layout import (
    GIB,
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
from .oracle import COMPONENTS, as_logged, error_pct, summarize

__all__ = [
    "COMPONENTS",
    "DRY_RUN",
    "DRY_RUN_PROJECTED",
    "GIB",
    "HOST",
    "HOST_OVERHEAD",
    "MARGIN_MIN",
    "MIB",
    "REPLAY",
    "REPLAY_ARCHS",
    "DeviceMemory",
    "KVCache",
    "MemoryEstimate",
    "as_logged",
    "beyond_trained",
    "cache_pairs",
    "ctx_sweep",
    "describe",
    "error_pct",
    "estimate",
    "gpu_engine",
    "margin",
    "max_ctx",
    "pad",
    "placement",
    "prefetch",
    "replay_gap",
    "summarize",
    "validate",
]
