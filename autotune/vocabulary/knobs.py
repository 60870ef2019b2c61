"""The knob table: every engine setting autotune knows, written down once.

Each entry gives the setting's type and default (llama-cpp-python's own, except the context length), its
``Llama(...)`` keyword, its spelling in llama-server, KoboldCpp, LM Studio and Ollama (None: that tool has
none), and its label in plots. ``Settings`` is built from this table; ``export`` writes and reads flags
from it; ``plots`` labels axes from it. Where a tool has no spelling for a setting that matters, the
knob's ``missing`` sentence becomes a note in that export. ``moves`` says which speeds a knob can change
(decode is one token per batch, so the batch knobs cannot move it): the search tunes the others in a second
stage. ``load`` knobs are fixed by a model load, ``cache`` knobs change what a saved history holds, ``host_only``
knobs matter only while layers stay on the host. Adding a knob is one entry here; a context parameter named like
its ``Llama(...)`` keyword reaches the engine by that name (``op_offload`` was added so), a model parameter
needs its line in ``engine.native.model_params``.

What stays outside the table is joint, not per knob: the search space samples flash attention with the
cache types, and ``n_batch`` as a multiple of ``n_ubatch`` (``space``); KoboldCpp's one ``--quantkv`` for
both cache types and Ollama's server-wide cache settings (``export``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gguf import GGMLQuantizationType


def default_threads() -> tuple[int, int]:
    """What llama-cpp-python picks when threads are left unset: half the logical CPUs, and all of them."""
    cpus = os.cpu_count() or 1
    return max(cpus // 2, 1), cpus


@dataclass(frozen=True)
class Flag:
    """A command-line spelling. A value flag takes the setting (``-c 4096``); a switch (``when`` set) is
    written alone when the setting has that value and means the other value when absent (``--no-mmap``)."""

    name: str
    aliases: tuple[str, ...] = ()
    when: Any = None
    encode: Callable[[Any], str] = str
    extra: tuple[str, ...] = ()  # written right after it (llama-server's ``--spec-draft-n-min 0``)
    unless: Any = None  # a value that is not written (the same in every tool: ``--n-cpu-moe 0``)

    @property
    def switch(self) -> bool:
        return self.when is not None

    def render(self, value: Any) -> list[str]:
        if self.switch:
            return [self.name] if value == self.when else []
        if self.unless is not None and value == self.unless:
            return []
        return [self.name, self.encode(value), *self.extra]


@dataclass(frozen=True)
class IntRange:
    """An integer knob searched over low..high (Optuna ``suggest_int``)."""

    low: int
    high: int


@dataclass(frozen=True)
class Where:
    """What a knob's search domain depends on, as plain values: the table sits below the model, the machine
    and the settings, and the search space (``space``) fills this in from them."""

    n_layer: int
    moe_layers: tuple[int, ...]  # layers with experts
    uses_swa: bool  # a sliding-window cache
    logical_cores: int
    gpus: bool  # the engine offloads to a GPU on this machine


# Which values the search may try on this machine for this model (None: not searched here): a tuple of
# choices (Optuna ``suggest_categorical``) or an IntRange.
Domain = Callable[[Where], tuple[Any, ...] | IntRange | None]


@dataclass(frozen=True)
class Knob:
    name: str  # the Settings field
    kind: str  # "bool", "int", "float", "str" or "path" (a file, or None)
    default: Any  # a value, or a function of nothing (the machine decides)
    label: str  # axis and table label
    llama: Callable[[Any], Any] | None = None  # the Llama(...) keyword's value (None: not a keyword)
    server: Flag | None = None  # llama-server / llama-cli
    kobold: Flag | None = None  # KoboldCpp
    lmstudio: tuple[str, Callable[[Any], Any]] | None = None  # LM Studio config key path ("load.x"), value
    ollama: tuple[str, Callable[[Any], Any]] | None = None  # Ollama Modelfile PARAMETER, value
    domain: Domain | None = None  # searched values; None: never searched alone (see space for joint ones)
    bench: Flag | None = None  # llama-bench (one value per flag: what one measured config runs)
    needs: str | None = None  # written only when this other setting is set (a draft model)
    spec: tuple[str, ...] = ()  # written only with these speculation kinds (spec_type); empty: always
    missing: str | None = None  # the note ({tool}, {value}) for a tool without a spelling, when not the default
    plotted: bool = True  # a knob the speed-per-knob plot may vary
    memory: bool = False  # changes what the engine allocates (part of a cached dry-run answer's key)
    load: bool = False  # fixed by the model load (a model parameter): runs differing only in others share a load
    cache: bool = True  # changes what the KV cache holds after a history is evaluated (else a saved one is reused)
    host_only: bool = False  # matters only while layers stay on the host: not searched with every layer on a GPU
    moves: tuple[str, ...] = ("decode", "prefill")  # the speeds it can change (decode: one token per batch)

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default


def _same(value: Any) -> Any:
    return value


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def _ggml_type(name: str) -> int:
    return int(GGMLQuantizationType[name.upper()])


def _true_false(value: bool) -> str:
    return "true" if value else "false"


def _threads(w: Where) -> IntRange:
    return IntRange(1, w.logical_cores)


def _gpu_layers(w: Where) -> IntRange | None:
    return IntRange(0, w.n_layer + 1) if w.gpus else None


def _on_gpus(w: Where) -> tuple[bool, ...] | None:
    return (True, False) if w.gpus else None


def _on_off_first(w: Where) -> tuple[bool, ...]:
    return (True, False)


def _off_on_first(w: Where) -> tuple[bool, ...]:
    return (False, True)


def _ubatches(w: Where) -> tuple[int, ...]:
    """A GPU prefills best in large micro-batches (llama.cpp's own default is 512; with layers on the host, op
    offload copies their weights over once per micro-batch, so 4096 or 8192 can pay); a CPU in smaller ones.
    The space drops those whose compute buffer does not fit (``space``)."""
    return (256, 512, 1024, 2048, 4096, 8192) if w.gpus else (64, 128, 256, 512, 1024)


def _choices(*values: Any) -> Domain:
    """A fixed set of values, whatever the machine (the speculation stage's parameters)."""
    return lambda w: values


def _sliding_window(w: Where) -> tuple[bool, ...] | None:
    return (True, False) if w.uses_swa else None


def _experts_on_host(w: Where) -> IntRange | None:
    """Searched only with a GPU to keep the other experts on: on the host alone it moves no memory."""
    return IntRange(0, max(w.moe_layers) + 1) if w.gpus and w.moe_layers else None


def _host_order(w: Where) -> tuple[str, ...] | None:
    """Which end the host's expert layers are counted from: a choice only where experts can go to a GPU."""
    return ("first", "last") if w.gpus and w.moe_layers else None


def _ffn_on_host(w: Where) -> IntRange | None:
    """Dense FFN weights on the host, attention on the GPU: a dense model's answer to a GPU too small for it."""
    return IntRange(0, w.n_layer) if w.gpus and not w.moe_layers else None


# How the spellings name the tensors a placement keeps in host memory (llama.cpp common/common.h): the experts
# (LLM_FFN_EXPS_REGEX, what --n-cpu-moe overrides) and the dense FFN weights (LLM_FFN_DENSE_REGEX, --n-cpu-ffn).
EXPERTS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
DENSE_FFN_REGEX = r"\.ffn_(up|down|gate)\."
HOST_ORDERS = ("first", "last")


# llama-server's --spec-type kinds (llama.cpp common/speculative.cpp). The draft kinds run a second model: a
# draft GGUF (draft-simple; eagle3 / dflash / dspark drafters trained for the main model) or the main model's
# own multi-token-prediction layers (draft-mtp). The n-gram kinds draft from the text itself.
DRAFT_KINDS = ("draft-simple", "draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark")
NGRAM_MAP_KINDS = ("ngram-simple", "ngram-map-k", "ngram-map-k4v")
NGRAM_KINDS = (*NGRAM_MAP_KINDS, "ngram-mod", "ngram-cache")
SPEC_TYPES = ("none", *DRAFT_KINDS, *NGRAM_KINDS)


KNOBS: tuple[Knob, ...] = (
    Knob(
        "n_ctx",
        "int",
        4096,
        "context length (n_ctx)",
        _same,
        Flag("-c", ("--ctx-size",)),
        Flag("--contextsize"),
        ("load.contextLength", _same),
        ("num_ctx", str),
        plotted=False,
        memory=True,
    ),
    Knob(
        "n_gpu_layers",
        "int",
        0,
        "GPU layers (n_gpu_layers)",
        _same,
        Flag("-ngl", ("--n-gpu-layers",)),
        Flag("--gpulayers"),
        ("load.gpu", lambda n: {"ratio": "max" if n > 0 else 0}),
        ("num_gpu", str),
        domain=_gpu_layers,
        memory=True,
        load=True,
        bench=Flag("-ngl"),
    ),
    Knob(
        "n_threads",
        "int",
        lambda: default_threads()[0],
        "decode threads (n_threads)",
        _same,
        Flag("-t", ("--threads",)),
        Flag("--threads"),
        ("load.cpuThreadPoolSize", _same),
        ("num_thread", str),
        domain=_threads,
        bench=Flag("-t"),
        moves=("decode",),
        cache=False,
        host_only=True,
    ),
    Knob(
        "n_threads_batch",
        "int",
        lambda: default_threads()[1],
        "prompt threads (n_threads_batch)",
        _same,
        Flag("-tb", ("--threads-batch",)),
        Flag("--blasthreads"),
        domain=_threads,
        moves=("prefill",),
        cache=False,
        host_only=True,
    ),
    Knob(
        "n_batch",
        "int",
        512,
        "n_batch",
        _same,
        Flag("-b", ("--batch-size",)),
        Flag("--blasbatchsize"),
        ("load.evalBatchSize", _same),
        ("num_batch", str),
        memory=True,
        bench=Flag("-b"),
        moves=("prefill",),
        cache=False,
    ),
    Knob(
        "n_ubatch",
        "int",
        512,
        "n_ubatch",
        _same,
        Flag("-ub", ("--ubatch-size",)),
        domain=_ubatches,
        memory=True,
        bench=Flag("-ub"),
        moves=("prefill",),
        cache=False,
    ),
    Knob(
        "flash_attn",
        "bool",
        False,
        "flash attention",
        _same,
        Flag("-fa", ("--flash-attn",), encode=_on_off),
        Flag("--flashattention", when=True),
        ("load.flashAttention", _same),
        memory=True,
        bench=Flag("-fa", encode=_on_off),
    ),
    Knob(
        "type_k",
        "str",
        "f16",
        "K cache type",
        _ggml_type,
        Flag("-ctk", ("--cache-type-k",)),
        lmstudio=("load.llamaKCacheQuantizationType", _same),
        plotted=False,
        memory=True,
        bench=Flag("-ctk"),
    ),
    Knob(
        "type_v",
        "str",
        "f16",
        "V cache type",
        _ggml_type,
        Flag("-ctv", ("--cache-type-v",)),
        lmstudio=("load.llamaVCacheQuantizationType", _same),
        plotted=False,
        memory=True,
        bench=Flag("-ctv"),
    ),
    Knob(
        "swa_full",
        "bool",
        True,
        "full-size sliding-window cache",
        _same,
        Flag("--swa-full", when=True),
        domain=_sliding_window,
        memory=True,
    ),
    Knob(
        "offload_kqv",
        "bool",
        True,
        "KV cache on the GPU",
        _same,
        Flag("--no-kv-offload", ("-nkvo",), when=False),
        lmstudio=("load.offloadKVCacheToGpu", _same),
        domain=_on_gpus,
        memory=True,
        bench=Flag("-nkvo", encode=lambda on: "0" if on else "1"),
        host_only=True,
    ),
    # A prompt's matrix products for layers left on the host run on the GPU, their weights copied over per batch
    Knob(
        "op_offload",
        "bool",
        True,
        "host layers' batches on the GPU (op_offload)",
        _same,
        Flag("--no-op-offload", when=False),
        domain=_on_gpus,
        memory=True,
        bench=Flag("-nopo", encode=lambda on: "0" if on else "1"),
        moves=("prefill",),
        cache=False,
        host_only=True,
        missing="{tool} has no setting we know of for llama.cpp's --no-op-offload; the tuned settings keep a "
        "prompt's host layers on the host (op_offload={value})",
    ),
    # Serving (llama-server): conversations decoded at once, and whether they share one KV buffer. One
    # sequence is what llama-cpp-python runs and what a tuned single-user config was measured with.
    Knob(
        "n_parallel",
        "int",
        1,
        "server slots (-np)",
        None,
        Flag("-np", ("--parallel",)),
        plotted=False,
        memory=True,
        missing="{tool} has no per-model setting for conversations decoded at once (llama-server "
        "-np; Ollama's OLLAMA_NUM_PARALLEL is server-wide); the tuned value is {value}",
    ),
    Knob(
        "kv_unified",
        "bool",
        False,
        "one KV buffer for all slots",
        None,
        Flag("--kv-unified", ("-kvu",), when=True),
        plotted=False,
        memory=True,
    ),
    # llama-server spells mmap and mlock as one load mode (-lm): written jointly by flags.server_flags
    Knob(
        "use_mmap",
        "bool",
        True,
        "mmap",
        _same,
        None,
        Flag("--nommap", when=False),
        ("load.tryMmap", _same),
        ("use_mmap", _true_false),
        domain=_on_off_first,
        load=True,
        cache=False,
        host_only=True,
    ),
    Knob(
        "use_mlock",
        "bool",
        False,
        "mlock",
        _same,
        None,
        Flag("--usemlock", when=True),
        ("load.keepModelInMemory", _same),
        domain=_off_on_first,
        load=True,
        cache=False,
        host_only=True,
    ),
    Knob(
        "use_extra_bufts",
        "bool",
        True,
        "extra buffer types (repack)",
        None,
        Flag("--no-repack", ("-nr",), when=False),
        domain=_on_off_first,
        memory=True,
        load=True,
        cache=False,
        host_only=True,
        bench=Flag("--repack", encode=lambda on: "1" if on else "0"),
        missing="{tool} has no setting we know of for extra buffer types (llama.cpp --no-repack); the tuned "
        "settings turn them off (use_extra_bufts=False), so {tool} may run slower or faster, and where "
        "autotune's engine self-check saw a crash with them on, {tool}'s engine may crash too",
    ),
    Knob(
        "n_cpu_moe",
        "int",
        0,
        "expert layers in host memory (n_cpu_moe)",
        None,
        Flag("-ncmoe", ("--n-cpu-moe",), unless=0),
        Flag("--moecpu", unless=0),
        domain=_experts_on_host,
        memory=True,
        load=True,
        bench=Flag("-ncmoe", unless=0),
        missing="{tool} has no setting for keeping the experts of the first N layers in host memory (llama.cpp "
        "--n-cpu-moe); the tuned N is {value} (LM Studio's 'Force Model Expert Weights onto CPU' is N = "
        "every layer)",
    ),
    # Which layers' experts those are: the first N (llama.cpp --n-cpu-moe), the last N (the order llama.cpp's --fit
    # uses), or a chosen set that replaces both. Written jointly with n_cpu_moe (``flags``): -ncmoe for the first
    # N, tensor overrides (-ot) naming the layers otherwise.
    Knob(
        "moe_host_from",
        "str",
        "first",
        "end the host's expert layers count from",
        None,
        domain=_host_order,
        memory=True,
        load=True,
        host_only=True,
        missing="{tool} has no setting for which layers' experts stay in host memory; the tuned order counts "
        "them from the {value} layer (llama.cpp -ot)",
    ),
    Knob(
        "moe_host_layers",
        "str",
        "",
        "layers whose experts stay in host memory",
        None,
        plotted=False,
        memory=True,
        load=True,
        missing="{tool} has no setting for keeping the experts of chosen layers in host memory; the tuned layers "
        "are {value} (llama.cpp -ot)",
    ),
    Knob(
        "n_cpu_ffn",
        "int",
        0,
        "dense FFN layers in host memory (n_cpu_ffn)",
        None,
        Flag("-ncffn", ("--n-cpu-ffn",), unless=0),
        domain=_ffn_on_host,
        memory=True,
        load=True,
        host_only=True,
        missing="{tool} has no setting for keeping the dense FFN weights of the first N layers in host memory "
        "(llama.cpp --n-cpu-ffn); the tuned N is {value}",
    ),
    # Speculative decoding, as llama-server does it natively (the speculation stage measures it there):
    # --spec-type picks the kind; a draft model is loaded with -md but drafts nothing until --spec-type says
    # how. The n-gram kinds need no draft model. Each kind's parameters are written only with that kind.
    Knob(
        "spec_type",
        "str",
        "none",
        "speculation (--spec-type)",
        None,
        Flag("--spec-type", unless="none"),
        plotted=False,
        missing="{tool} has no setting for llama.cpp's speculative decoding kinds (--spec-type); the tuned "
        "config speculates with {value} in llama-server",
    ),
    Knob(
        "draft_model",
        "path",
        None,
        "draft model",
        None,
        Flag("-md", ("--model-draft", "--spec-draft-model")),
        Flag("--draftmodel"),
        ("prediction.draftModel", _same),
        needs="draft_model",
        plotted=False,
        spec=DRAFT_KINDS,
        missing="{tool} has no draft-model setting; the tuned draft was {value}",
    ),
    Knob(
        "draft_max",
        "int",
        0,
        "draft tokens per step",
        None,
        Flag("--spec-draft-n-max", ("--draft-max", "--draft", "--draft-n"), extra=("--spec-draft-n-min", "0")),
        Flag("--draftamount"),
        plotted=False,
        spec=DRAFT_KINDS,
        domain=_choices(2, 3, 4, 6, 8, 12, 16),
    ),
    Knob(
        "draft_p_min",
        "float",
        0.0,
        "draft's least greedy probability",
        None,
        Flag("--spec-draft-p-min", ("--draft-p-min",)),
        plotted=False,
        spec=DRAFT_KINDS,
        domain=_choices(0.0, 0.5, 0.75, 0.9),
    ),
    Knob(
        "draft_gpu_layers",
        "int",
        0,
        "draft GPU layers",
        None,
        Flag("-ngld", ("--gpu-layers-draft", "--spec-draft-ngl", "--n-gpu-layers-draft")),
        Flag("--draftgpulayers"),
        needs="draft_model",
        plotted=False,
        spec=DRAFT_KINDS,
    ),
    # ngram-simple, ngram-map-k and ngram-map-k4v: look the last n tokens up in what came before, draft the m
    # that followed them there (seen at least min-hits times)
    Knob(
        "ngram_n",
        "int",
        12,
        "n-gram looked up",
        None,
        Flag("--spec-{spec_type}-size-n"),
        plotted=False,
        spec=NGRAM_MAP_KINDS,
        domain=_choices(2, 3, 4, 6, 8, 12),
    ),
    Knob(
        "ngram_m",
        "int",
        48,
        "tokens drafted after it",
        None,
        Flag("--spec-{spec_type}-size-m"),
        plotted=False,
        spec=NGRAM_MAP_KINDS,
        domain=_choices(4, 8, 16, 32, 48),
    ),
    Knob(
        "ngram_min_hits",
        "int",
        1,
        "times seen before drafted",
        None,
        Flag("--spec-{spec_type}-min-hits"),
        plotted=False,
        spec=NGRAM_MAP_KINDS,
        domain=_choices(1, 2),
    ),
    # ngram-mod: a rolling hash of the last n-match tokens; drafts between n-min and n-max tokens
    Knob(
        "ngram_mod_match",
        "int",
        24,
        "ngram-mod lookup length",
        None,
        Flag("--spec-ngram-mod-n-match"),
        plotted=False,
        spec=("ngram-mod",),
        domain=_choices(4, 8, 16, 24),
    ),
    Knob(
        "ngram_mod_min",
        "int",
        48,
        "ngram-mod least draft",
        None,
        Flag("--spec-ngram-mod-n-min"),
        plotted=False,
        spec=("ngram-mod",),
        domain=_choices(1, 4, 16, 48),
    ),
    Knob(
        "ngram_mod_max",
        "int",
        64,
        "ngram-mod most draft",
        None,
        Flag("--spec-ngram-mod-n-max"),
        plotted=False,
        spec=("ngram-mod",),
        domain=_choices(8, 16, 32, 64),
    ),
)
BY_NAME = {k.name: k for k in KNOBS}
