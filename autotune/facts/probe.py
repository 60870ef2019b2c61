"""What this machine is: cores, memory, GPUs, the engine's build, and measured memory bandwidth.

Every source is optional: where NVML, macOS or a Vulkan loader is absent the probe records why in
``notes`` and carries on. Other commands take a ``Hardware`` value, so tests can describe machines we
do not have by constructing one. The engine's build is handed in by the caller (``probe(build)``): this layer
sits below the engine and only asks it through the small ``Build`` protocol.
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import hashlib
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import psutil

from ..vocabulary.errors import SettingsError
from ..vocabulary.settings import Settings

SCHEMA = 1
MIB = 2**20


@dataclass(frozen=True)
class BuildInfo:
    """What an engine build was compiled for, as it says itself."""

    version: str
    backend: str
    can_offload: bool
    cpu_features: tuple[str, ...]
    system_info: str


class Build(Protocol):
    """The engine build installed here, as the layers below the engine ask it (the engine package's ``bundled``
    is one): its facts, its identity (dry-run answers and learned GPU overheads are kept per build) and its
    no-allocation dry run, which prices what the memory model cannot replay."""

    def build_info(self) -> BuildInfo: ...

    def build_key(self) -> str: ...

    def dry_run(self, model_path: str, settings: list[Settings], timeout: float = 300) -> list[Any]: ...


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    backend: str  # "cuda", "metal" or "vulkan"
    vram_total: int  # bytes
    vram_free: int  # bytes
    driver: str = ""
    compute_capability: str = ""
    budget: int | None = None  # bytes a run may use here in all (--gpu-budget); None: whatever is free


@dataclass(frozen=True)
class Hardware:
    cpu_model: str
    physical_cores: int
    logical_cores: int
    ram_total: int
    ram_available: int
    swap_total: int = 0
    swap_free: int = 0
    gpus: tuple[GPU, ...] = ()
    backend: str = "cpu"  # what the engine was built with: cpu, cuda, metal, vulkan
    can_offload: bool = False
    cpu_features: tuple[str, ...] = ()  # ISA features the engine was compiled for
    engine_version: str = ""
    bandwidth_gbs: float | None = None  # measured host memory copy bandwidth, GB/s
    os: str = field(default_factory=platform.system)
    notes: tuple[str, ...] = ()
    # the engine build that prices memory here (dry runs, learned overheads); None for a described machine, which
    # only the replay prices. Not a fact of the record: left out of the JSON and of equality.
    build: Build | None = field(default=None, compare=False, repr=False)

    @property
    def offload_gpus(self) -> tuple[GPU, ...]:
        """GPUs the engine can actually use (the build's backend must match and offload must work)."""
        if not self.can_offload:
            return ()
        return tuple(g for g in self.gpus if g.backend == self.backend)

    def with_gpu_budget(self, mib: tuple[int, ...] | None) -> Hardware:
        """This machine with at most ``mib`` MiB used on each GPU the engine offloads to (one value: every GPU;
        else one per GPU, in order). People keep room for a desktop or a second model: every estimate, fit and
        run then keeps to it. SettingsError where it cannot apply (no GPU to budget, a count that does not
        match the GPUs)."""
        if not mib:
            return self
        gpus = self.offload_gpus
        if not gpus:
            why = "no GPU found" if not self.gpus else f"the engine's {self.backend} build cannot offload to them"
            raise SettingsError(f"--gpu-budget: this machine has no GPU the engine can use ({why}); leave it out")
        if len(mib) not in (1, len(gpus)):
            raise SettingsError(
                f"--gpu-budget gives {len(mib)} values for {len(gpus)} GPU(s): give one value for "
                "every GPU, or one per GPU"
            )
        per = dict(zip((g.index for g in gpus), mib * len(gpus) if len(mib) == 1 else mib, strict=False))
        return dataclasses.replace(
            self,
            gpus=tuple(dataclasses.replace(g, budget=per[g.index] * MIB) if g.index in per else g for g in self.gpus),
        )

    @property
    def gpu_budget(self) -> int | None:
        """Bytes the budgeted GPUs may hold together (a run's recorded peak is their sum); None: no budget."""
        budgets = [g.budget for g in self.offload_gpus if g.budget is not None]
        return sum(budgets) if budgets else None

    def fingerprint(self) -> str:
        """Stable identity of the machine for naming studies: free memory and bandwidth are left out; a GPU
        budget is in (trials measured without it may not keep to it)."""
        parts = [
            self.cpu_model,
            str(self.physical_cores),
            str(self.logical_cores),
            str(round(self.ram_total / 2**30)),
            self.backend,
            *(f"{g.name}:{round(g.vram_total / 2**30)}" for g in self.gpus),
            *(f"gpu{g.index} budget {g.budget}" for g in self.gpus if g.budget is not None),
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(dataclasses.replace(self, build=None))
        del data["build"]
        data["schema"] = SCHEMA
        data["fingerprint"] = self.fingerprint()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hardware:
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in data.items() if k in names}
        kept["gpus"] = tuple(GPU(**g) for g in kept.get("gpus", ()))
        for key in ("cpu_features", "notes"):
            kept[key] = tuple(kept.get(key, ()))
        return cls(**kept)


def parse_gpu_budget(text: str | None) -> tuple[int, ...] | None:
    """``--gpu-budget``: MiB for every GPU (``12288``) or per GPU (``12288,8192``); SettingsError, one line, for
    anything else."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SettingsError(
            f"--gpu-budget {text!r}: give MiB as positive whole numbers, one for every GPU (12288) "
            "or one per GPU (12288,8192)"
        )
    return tuple(int(p) for p in parts)


def probe(build: Build, measure_bandwidth: bool = True) -> Hardware:
    """Probe this machine running ``build`` (the caller's engine build: its facts are recorded and it prices
    memory later). Takes about a second, most of it the bandwidth measurement."""
    notes: list[str] = []
    mem = psutil.virtual_memory()
    swap = psutil.swap_memory()
    gpus = list(_nvidia_gpus(notes))
    gpus += _apple_gpu(mem.total, notes)
    gpus += _vulkan_gpus(notes, start=len(gpus))
    info = build.build_info()
    return Hardware(
        cpu_model=_cpu_model(),
        physical_cores=psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
        logical_cores=psutil.cpu_count() or 1,
        ram_total=mem.total,
        ram_available=mem.available,
        swap_total=swap.total,
        swap_free=swap.free,
        gpus=tuple(gpus),
        backend=info.backend,
        can_offload=info.can_offload,
        cpu_features=info.cpu_features,
        engine_version=info.version,
        bandwidth_gbs=measure_bandwidth_gbs() if measure_bandwidth else None,
        notes=tuple(notes),
        build=build,
    )


def measure_bandwidth_gbs(size_mib: int = 256, seconds: float = 1.0) -> float:
    """Host memory bandwidth from timed large copies (read + write bytes), the best of repeated runs.

    Decode on the CPU streams every weight once per token, so this number bounds CPU decode speed.
    """
    src = np.ones(size_mib * 2**20 // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        np.copyto(dst, src)
        dt = time.perf_counter() - t0
        best = max(best, 2 * src.nbytes / dt / 1e9)
    return round(best, 2)


def _cpu_model() -> str:
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith(("model name", "Hardware", "cpu model")):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return platform.processor() or platform.machine()


def _nvidia_gpus(notes: list[str]) -> list[GPU]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # no driver, no library, no device: all mean "no NVIDIA GPU here"
        notes.append(f"NVML unavailable ({type(e).__name__}): no NVIDIA GPUs listed")
        return []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            found.append(
                GPU(
                    index=i,
                    name=_text(pynvml.nvmlDeviceGetName(h)),
                    backend="cuda",
                    vram_total=int(memory.total),
                    vram_free=int(memory.free),
                    driver=driver,
                    compute_capability=f"{major}.{minor}",
                )
            )
        return found
    finally:
        pynvml.nvmlShutdown()


def _apple_gpu(ram_total: int, notes: list[str]) -> list[GPU]:
    if sys.platform != "darwin":
        notes.append("not macOS: no Apple unified-memory GPU")
        return []
    if platform.machine() != "arm64":
        notes.append("Intel Mac: no Metal offload for llama.cpp")
        return []
    # Metal's recommended working set is about 2/3 of RAM on small Macs and 3/4 on large ones
    # (iogpu.wired_limit_mb overrides it when set).
    limit = ram_total * (3 / 4 if ram_total > 36 * 2**30 else 2 / 3)
    out = subprocess.run(["sysctl", "-n", "iogpu.wired_limit_mb"], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout) > 0:
        limit = int(out.stdout) * 2**20
    return [
        GPU(
            index=0,
            name=f"Apple {platform.machine()} GPU",
            backend="metal",
            vram_total=int(limit),
            vram_free=int(limit),
        )
    ]


def _vulkan_gpus(notes: list[str], start: int) -> list[GPU]:
    if not ctypes.util.find_library("vulkan"):
        notes.append("no Vulkan loader: no Vulkan devices listed")
        return []
    try:
        out = subprocess.run(["vulkaninfo", "--summary"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        notes.append("Vulkan loader present but vulkaninfo is not: Vulkan devices not listed")
        return []
    names = [line.split("=", 1)[1].strip() for line in out.stdout.splitlines() if "deviceName" in line]
    return [GPU(index=start + i, name=n, backend="vulkan", vram_total=0, vram_free=0) for i, n in enumerate(names)]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def dumps(hw: Hardware) -> str:
    return json.dumps(hw.to_dict(), indent=2)
