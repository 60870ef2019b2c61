"""The engine's own API, called from our code in the child process: load a model, create a context, evaluate
tokens, read logits. Every stage is marked here, where we call the library, so a crash report names it; faults
are injected only through the ``faults`` object a child is given (None in a real run).

Imported only in engine children, after the library has loaded (``process.CHILD``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import llama_cpp as L
import numpy as np
import numpy.typing as npt

from ..facts.gguf_model import EXPERTS, read_facts
from ..vocabulary.errors import SettingsError
from ..vocabulary.knobs import DENSE_FFN_REGEX
from ..vocabulary.settings import Settings, parse_layers
from .base import last_error, mark


class Faults(Protocol):
    """What an injected fault may do (``faults.Injected``); a real run has none."""

    def before_load(self) -> None: ...

    def before_batch(self, n_tokens: int, extra_bufts: bool) -> None: ...

    def after_load(self, index: int) -> None: ...


class Refused(Exception):
    """The engine refused to load the model or create the context: the message is its reason."""


# ---------------------------------------------------------------------------------------------- the log


@contextlib.contextmanager
def captured_log(echo: bool = False) -> Iterator[list[str]]:
    """Collect everything the engine logs while the block runs (it reports buffer sizes only there).

    ``echo`` also writes it to stderr, so a parent still sees the last lines if the engine crashes.
    """
    lines: list[str] = []

    @L.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode(errors="replace"))
        if echo:
            sys.stderr.write(lines[-1])

    L.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        # Joined fragments: the engine sometimes logs one line in several calls.
        lines[:] = "".join(lines).splitlines()
        silence()


@L.llama_log_callback
def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    return None


def silence() -> None:
    """Stop the engine writing its log to stderr (callers read what they need through captured_log)."""
    L.llama_log_set(_quiet, ctypes.c_void_p(0))


# ------------------------------------------------------------------------------------------- parameters


def model_params(settings: Settings, defaults: Any = None, moe_layers: Iterable[int] | None = None) -> Any:
    """``llama_model_params`` for ``settings``: placement and buffer types (the load mode is the caller's),
    starting from ``defaults()`` (the engine's ``llama_model_default_params``; the Python export passes it).
    ``moe_layers``, the model's expert layers, is needed only to find the last N of them; without it the first N
    layers and a chosen set are named as written."""
    params = (defaults or L.llama_model_default_params)()
    params.n_gpu_layers = settings.n_gpu_layers
    params.use_extra_bufts = settings.use_extra_bufts
    experts = settings.experts_on_host(_as_written(settings) if moe_layers is None else moe_layers)
    ffn = settings.ffn_on_host()
    if experts or ffn:
        params.tensor_buft_overrides = ctypes.addressof(_host_overrides(experts, ffn))
    return params


def _as_written(settings: Settings) -> Iterable[int]:
    """The layers the settings name without the model: a chosen set, or the first n_cpu_moe."""
    if settings.moe_host_layers:
        return parse_layers(settings.moe_host_layers)
    if settings.moe_host_from != "first" and settings.n_cpu_moe:
        raise SettingsError(
            f"the experts of the {settings.moe_host_from} {settings.n_cpu_moe} layers need the model's expert layers"
        )
    return range(settings.n_cpu_moe)


@lru_cache(maxsize=16)
def _host_overrides(experts: frozenset[int], ffn: frozenset[int]) -> Any:
    """llama.cpp's --n-cpu-moe / -ot and --n-cpu-ffn: a NULL-terminated override list sending the expert tensors of
    ``experts`` and the dense FFN weights of ``ffn`` to the CPU buffer type, one pattern per layer as llama.cpp
    writes them. Cached by the layer sets, so the array and its pattern strings outlive every load using them."""

    class Override(ctypes.Structure):  # struct llama_model_tensor_buft_override (not bound by llama-cpp-python)
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

    cpu = _cpu_buffer_type()
    patterns = [f"blk\\.{i}{EXPERTS.pattern}" for i in sorted(experts)]
    patterns += [f"blk\\.{i}{DENSE_FFN_REGEX}" for i in sorted(ffn)]
    array = (Override * (len(patterns) + 1))()
    for entry, pattern in zip(array, patterns, strict=False):
        entry.pattern = pattern.encode()
        entry.buft = cpu
    return array


def _cpu_buffer_type() -> int:
    """The CPU backend's buffer type, as its device reports it: the one llama.cpp's tools put in their overrides,
    and the one the loader recognises, so a tensor sent to the CPU may still go to the host buffer types before it
    (a GPU's pinned host memory, AMX, CPU_REPACK) exactly as with --n-cpu-moe. (libggml-base exports a
    ``ggml_backend_cpu_buffer_type`` of its own, which the loader takes for a foreign buffer type: plain memory,
    never repacked.)"""
    import llama_cpp._ctypes_extensions as ext

    lib_dir = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(L.__file__).parent / "lib")
    ggml, base = ext.load_shared_library("ggml", lib_dir), ext.load_shared_library("ggml-base", lib_dir)
    ggml.ggml_backend_dev_by_type.restype, ggml.ggml_backend_dev_by_type.argtypes = ctypes.c_void_p, [ctypes.c_int]
    base.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    base.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    return int(base.ggml_backend_dev_buffer_type(ggml.ggml_backend_dev_by_type(0)))  # GGML_BACKEND_DEVICE_TYPE_CPU


def context_params(settings: Settings) -> Any:
    """``llama_context_params`` for ``settings``: every field the knob table gives a ``Llama(...)`` keyword of
    the same name, flash attention as the engine's tri-state (off means off, not auto)."""
    params = L.llama_context_default_params()
    for key, value in settings.llama_kwargs().items():
        if hasattr(params, key):
            setattr(params, key, value)
    params.flash_attn_type = (
        L.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    return params


# ---------------------------------------------------------------------------------------- model, context


class Model:
    """A loaded model. ``alloc=False`` is the engine's dry run: nothing allocated, buffer sizes logged."""

    def __init__(
        self,
        path: str,
        settings: Settings,
        alloc: bool = True,
        echo: bool = False,
        vocab_only: bool = False,
        faults: Faults | None = None,
    ) -> None:
        params = model_params(settings, moe_layers=read_facts(path).moe_layers if settings.experts_by_layer() else None)
        params.vocab_only = vocab_only
        if alloc:
            params.load_mode = L.LLAMA_LOAD_MODE_MMAP if settings.use_mmap else L.LLAMA_LOAD_MODE_NONE
            if settings.use_mlock:
                params.load_mode |= L.LLAMA_LOAD_MODE_MLOCK
        else:
            params.no_alloc = True
            params.load_mode = L.LLAMA_LOAD_MODE_NONE  # mmap together with no_alloc aborts
        mark("loading the model" + (" (extra buffer types on)" if settings.use_extra_bufts else ""))
        if faults is not None:
            faults.before_load()
        with captured_log(echo) as lines:
            self.ptr = L.llama_model_load_from_file(path.encode(), params)
        self.log = lines
        if not self.ptr:
            raise Refused(last_error(lines) or "the engine could not load the model")
        self.path = path
        self.extra_bufts = settings.use_extra_bufts
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.weights_total = int(L.llama_model_size(self.ptr))

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Tokens of ``text`` (special tokens not parsed), with the model's BOS when ``add_bos``."""
        data = text.encode()
        capacity = len(data) + 8
        out = (L.llama_token * capacity)()
        n = L.llama_tokenize(self.vocab, data, len(data), out, capacity, add_bos, False)
        if n < 0:  # too small: the engine says how many it needs
            capacity = -n
            out = (L.llama_token * capacity)()
            n = L.llama_tokenize(self.vocab, data, len(data), out, capacity, add_bos, False)
        return list(out[:n])

    def close(self) -> None:
        if self.ptr:
            L.llama_model_free(self.ptr)
            self.ptr = None


class Context:
    """One sequence in a context of ``model``, evaluated the way llama-cpp-python's ``Llama`` does it: tokens
    are appended at ``n_tokens`` (lower it to drop the cache past it), ``input_ids`` holds them, logits are kept
    for the last token, or for every token when asked."""

    def __init__(self, model: Model, settings: Settings, faults: Faults | None = None, echo: bool = False) -> None:
        mark(f"creating a context of {settings.n_ctx} tokens")
        with captured_log(echo) as lines:
            self.ptr = L.llama_init_from_model(model.ptr, context_params(settings))
        self.log = lines
        if not self.ptr:
            raise Refused(last_error(lines) or "the engine refused the context")
        self.model = model
        self.faults = faults
        self.n_batch = int(L.llama_n_batch(self.ptr))
        self._n_ctx = int(L.llama_n_ctx(self.ptr))
        self.memory = L.llama_get_memory(self.ptr)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.input_ids: npt.NDArray[np.intc] = np.zeros(self._n_ctx, dtype=np.intc)
        self.n_tokens = 0
        self._cached = 0  # positions the cache holds: an eval drops those past n_tokens only when there are some
        self._stage = ""

    def n_ctx(self) -> int:
        return self._n_ctx

    def reset(self) -> None:
        self.n_tokens = 0

    def eval(self, tokens: list[int], all_logits: bool = False) -> npt.NDArray[np.float32] | None:
        """Append ``tokens`` after the first ``n_tokens`` (the cache past them is dropped first), in batches of
        at most n_batch. Returns a copy of every token's logits with ``all_logits``, else None (the last
        token's stay readable through ``greedy``)."""
        if self.n_tokens + len(tokens) > self._n_ctx:
            raise RuntimeError(f"{self.n_tokens + len(tokens)} tokens do not fit the context of {self._n_ctx}")
        again = 0
        if self.n_tokens < self._cached and not L.llama_memory_seq_rm(self.memory, 0, self.n_tokens, -1):
            # a recurrent state cannot be cut back: start over and evaluate the kept tokens again (as Llama does)
            again = self.n_tokens
            L.llama_memory_clear(self.memory, True)
            tokens = self.input_ids[:again].tolist() + list(tokens)
            self.n_tokens = 0
        rows = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = self.n_tokens + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits or i == len(chunk) - 1
            self._decode(len(chunk))
            if all_logits:
                rows.append(
                    np.ctypeslib.as_array(L.llama_get_logits(self.ptr), shape=(len(chunk), self.model.n_vocab)).copy()
                )
            self.input_ids[self.n_tokens : self.n_tokens + len(chunk)] = chunk
            self.n_tokens += len(chunk)
            self._cached = self.n_tokens
        return np.concatenate(rows)[again:] if all_logits and rows else None

    def _decode(self, n: int) -> None:
        stage = "a one-token decode step" if n == 1 else f"a batch of {n} tokens"
        if stage != self._stage:
            mark(stage)
            self._stage = stage
        if self.faults is not None:
            self.faults.before_batch(n, self.model.extra_bufts)
        rc = L.llama_decode(self.ptr, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {n} tokens at position {self.n_tokens}")

    def greedy(self) -> int:
        """The most likely next token after the last evaluated one."""
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ptr, -1), shape=(self.model.n_vocab,))
        return int(logits.argmax())

    def close(self) -> None:
        if self.ptr:
            L.llama_batch_free(self.batch)
            L.llama_free(self.ptr)
            self.ptr = None
