"""A GPU's memory beyond the engine's buffers: what the engine child reads per GPU (NVML, faked at the module:
``fake_nvml``), the pool priced from ggml-cuda's allocations, and the allowance learned per GPU, driver and build."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from autotune import engine, memory
from autotune.engine import Measurement, Workload, external
from autotune.engine.base import GpuPeak
from autotune.engine.process import VramWatch, visible
from autotune.facts import synth
from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import GPU, Hardware
from autotune.memory import overhead
from autotune.vocabulary.settings import Settings

MIB = 2**20
GIB = 2**30
NOT_OURS = 2**22 + 12345  # above Linux's default pid_max: no such process, as a PID of another namespace reads


class FakeNvml(types.ModuleType):
    """pynvml as a machine's driver would answer: GPUs (name, UUID), each one's memory in use, and the processes
    NVML lists on it with their memory (None: no per-process accounting)."""

    def __init__(self, gpus: list[tuple[str, str]], used: list[int], processes: list[list[tuple[int, int | None]]]):
        super().__init__("pynvml")
        self.gpus, self.used, self.processes, self.open = gpus, used, processes, 0

    def nvmlInit(self) -> None:
        self.open += 1

    def nvmlShutdown(self) -> None:
        self.open -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return self.gpus[h][0]

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self.gpus[h][1]

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"580.95.05"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=self.used[h])

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.processes[h]]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: int) -> list[Any]:
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch):
    def install(*args: Any) -> FakeNvml:
        fake = FakeNvml(*args)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return install


def _watch(base: dict[str, int] | None) -> list[GpuPeak]:
    """One watch of this process as the engine child: the poll thread reads once at least before it stops."""
    watch = VramWatch(os.getpid(), base)
    return watch.stop()


def test_the_childs_own_use_is_preferred_over_the_device_wide_fake_nvml(fake_nvml):
    """Another program takes 3 GiB during the run: the device-wide reading would count it; the child's own does
    not."""
    nvml = fake_nvml([("NVIDIA H200", "GPU-aaaa")], [9000 * MIB], [[(os.getpid(), 5000 * MIB), (NOT_OURS, 3000 * MIB)]])
    assert _watch({"CUDA0": 1000 * MIB}) == [GpuPeak("CUDA0", "NVIDIA H200", "580.95.05", 5000 * MIB, "process")]
    assert nvml.open == 0  # every NVML session closed


def test_device_wide_use_where_nvml_cannot_see_the_child_fake_nvml(fake_nvml):
    """A container's PID namespace (the child is not listed) or no per-process accounting (memory None): the
    device's use less what was in use before, and the record says so."""
    fake_nvml([("NVIDIA H200", "GPU-aaaa")], [9000 * MIB], [[(NOT_OURS, 3000 * MIB), (os.getpid(), None)]])
    assert _watch({"CUDA0": 1000 * MIB}) == [GpuPeak("CUDA0", "NVIDIA H200", "580.95.05", 8000 * MIB, "device")]


def test_cuda_visible_devices_chooses_and_orders_the_gpus_fake_nvml(fake_nvml, monkeypatch):
    """The child sees NVML's GPU 2 as CUDA0 and the one whose UUID starts GPU-aa as CUDA1; GPU 1 is not its."""
    fake_nvml([("NVIDIA A100", "GPU-aaaa-1"), ("NVIDIA L4", "GPU-bbbb-2"), ("NVIDIA H100", "GPU-cccc-3")],
              [100 * MIB, 7000 * MIB, 300 * MIB],
              [[(os.getpid(), 1500 * MIB)], [(NOT_OURS, 7000 * MIB)], [(os.getpid(), 2500 * MIB)]])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-aa")
    peaks = _watch(None)
    assert [(g.device, g.name, g.peak, g.source) for g in peaks] == [
        ("CUDA0", "NVIDIA H100", 2500 * MIB, "process"), ("CUDA1", "NVIDIA A100", 1500 * MIB, "process")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _watch(None) == []  # nothing visible: nothing read


def test_visible_reads_cuda_visible_devices_as_cuda_does():
    uuids = ["GPU-aaaa-1", "GPU-bbbb-2", "GPU-abcd-3"]
    assert visible(None, uuids) == [0, 1, 2]
    assert visible("1,0", uuids) == [1, 0]
    assert visible("1,7,0", uuids) == [1]  # an entry naming no GPU ends the list
    assert visible("GPU-bb, 0", uuids) == [1, 0]
    assert visible("GPU-a", uuids) == []  # ambiguous prefix
    assert visible("-1", uuids) == [] and visible("", uuids) == [] and visible("MIG-x", uuids) == []
    assert visible("0,0", uuids) == [0]


def test_a_polluted_run_is_forgotten_after_keep_runs():
    """One run whose peak another program inflated raises the allowance for the next ``KEEP`` runs only; the
    allowance is the largest of the recent ones, so it still covers every real run seen lately."""
    args = ("build-a", "NVIDIA H200", "580.95.05", "dense")
    overhead.observe(*args, peak=5000 * MIB + 3000 * MIB, held=5000 * MIB, priced=0, source="device")  # polluted
    for fixed in (600, 640, 610, 620, 605, 615, 630):
        overhead.observe(*args, peak=(5000 + fixed) * MIB, held=5000 * MIB, priced=0)
    assert overhead.allowance(*args) == (3000 * MIB, True)  # 8 observations: the polluted one among them
    overhead.observe(*args, peak=5600 * MIB, held=5000 * MIB, priced=0)
    assert overhead.allowance(*args) == (640 * MIB, True)  # gone; the largest real one stays


def test_an_unseen_gpu_driver_build_or_kind_gets_the_stated_default():
    overhead.observe("build-b", "NVIDIA H200", "580.95.05", "dense", peak=6000 * MIB, held=5000 * MIB, priced=0)
    assert overhead.allowance("build-b", "NVIDIA H200", "580.95.05", "dense") == (1000 * MIB, True)
    assert overhead.allowance("build-b", "NVIDIA H200", "590.10", "dense") == (overhead.DEFAULT["dense"], False)
    assert overhead.allowance("build-b", "NVIDIA H100", "580.95.05", "dense") == (overhead.DEFAULT["dense"], False)
    assert overhead.allowance("build-c", "NVIDIA H200", "580.95.05", "dense") == (overhead.DEFAULT["dense"], False)
    assert overhead.allowance("build-b", "NVIDIA H200", "580.95.05", "moe") == (overhead.DEFAULT["moe"], False)
    assert "580.95.05" in overhead.key("build-b", "NVIDIA H200", "580.95.05", "dense")


@pytest.fixture(scope="module")
def dense_8b(demo_model, tmp_path_factory) -> Any:
    path = tmp_path_factory.mktemp("ovh") / "8b.gguf"
    return read_facts(synth.write_model(path, demo_model, synth.SHAPES["8b"], "Q4_K", header_only=True, vocab=2048))


@pytest.fixture(scope="module")
def moe_30b(demo_model, tmp_path_factory) -> Any:
    path = tmp_path_factory.mktemp("ovh") / "moe.gguf"
    shape = synth.SHAPES["qwen3-30b-a3b"]
    return read_facts(synth.write_model(path, demo_model, shape, "Q4_K", header_only=True, vocab=2048))


def S(**kw: Any) -> Settings:
    return Settings(n_threads=1, n_threads_batch=1, **kw)


def test_the_pool_is_what_ggml_cuda_borrows(dense_8b, moe_30b):
    """FA on: MMQ's q8_1 copy of the widest activations (ffn_down's 14,336 inputs x 512 tokens); FA off: KQV's
    f16 copy of the softmaxed KQ (cells x tokens x heads) and its f16 result; experts: each token once per expert
    used; attention and FFN on the host: nothing."""
    s = S(n_ctx=8192, n_ubatch=512, n_gpu_layers=33, flash_attn=True)
    assert overhead.pool(dense_8b, s) == 512 * 14336 * 144 // 128
    assert overhead.pool(dense_8b, s.replace(flash_attn=False)) == 2 * 8192 * 512 * 32 + 2 * 128 * 512 * 32
    assert overhead.pool(dense_8b, s.replace(flash_attn=False), kv_cells=1024, ubatch=64) == (
        2 * 1024 * 64 * 32 + 2 * 128 * 64 * 32)  # an emptier cache, a smaller micro-batch
    assert overhead.pool(dense_8b, s.replace(n_gpu_layers=0)) == 0
    assert overhead.pool(moe_30b, s) == 512 * 8 * 2048 * 144 // 128
    assert overhead.cells_of(s, prompt_tokens=512, depth=7424) == (7936, 512)
    assert overhead.cells_of(s, prompt_tokens=100, depth=8000) == (7680, 512)  # the history's fullest micro-batch
    assert overhead.cells_of(s.replace(n_ctx=4096), prompt_tokens=512, depth=4000) == (4096, 512)  # at most the context


def _run(settings: Settings, peaks: list[GpuPeak], buffers: dict[str, Any]) -> Measurement:
    return Measurement(settings, True, buffers=buffers, gpu_peaks=peaks, peak_vram=sum(g.peak for g in peaks))


def test_learn_reads_each_gpu_of_a_run_apart(dense_8b):
    """Per GPU: its peak less its own logged buffers (host ones never count) and the pool priced at the run's
    fill; a GPU holding no buffer teaches nothing."""
    s = S(n_ctx=8192, n_ubatch=512, n_gpu_layers=33, flash_attn=False)
    buffers = {"model": {"CUDA0": 3000 * MIB, "CUDA1": 1000 * MIB, "CPU_Mapped": 400 * MIB},
               "kv": {"CUDA0": 600 * MIB, "CUDA1": 400 * MIB}, "compute": {"CUDA_Host": 50 * MIB}}
    peaks = [GpuPeak("CUDA0", "NVIDIA H200", "580.95.05", 4300 * MIB, "process"),
             GpuPeak("CUDA1", "NVIDIA H100", "580.95.05", 2200 * MIB, "process"),
             GpuPeak("CUDA2", "NVIDIA H100", "580.95.05", 0, "process")]
    work = Workload(prompt_tokens=512, depth=1536)
    priced = overhead.pool(dense_8b, s, kv_cells=2048, ubatch=512)
    learned = overhead.learn("build-d", dense_8b, _run(s, peaks, buffers), work)
    assert learned == {"CUDA0": 700 * MIB - priced, "CUDA1": 800 * MIB - priced}
    assert overhead.allowance("build-d", "NVIDIA H100", "580.95.05", "dense") == (800 * MIB - priced, True)
    failed = dataclasses.replace(_run(s, peaks, buffers), ok=False)
    assert overhead.learn("build-e", dense_8b, failed, work) == {}


def test_the_estimate_adds_each_gpus_own_allowance_fake_gpu(dense_8b):
    """Two constructed GPUs of different models: each gets what was learned for its model and driver, the other
    the default; the estimate says the overhead is learned only when every GPU's is."""
    gpus = tuple(GPU(index=i, name=n, backend="cuda", vram_total=80 * GIB, vram_free=80 * GIB, driver="580.95.05")
                 for i, n in enumerate(("fake-h200", "fake-l4")))
    hw = Hardware(cpu_model="test", physical_cores=2, logical_cores=2, ram_total=64 * GIB, ram_available=64 * GIB,
                  cpu_features=engine.build_info().cpu_features, gpus=gpus, backend="cuda", can_offload=True,
                  build=engine.bundled)
    s = S(n_ctx=8192, n_gpu_layers=33, flash_attn=True)
    before = memory.estimate(dense_8b, s, hw)
    assert not before.gpu_overhead_learned
    overhead.observe(engine.build_key(), "fake-h200", "580.95.05", "dense", 5700 * MIB, 5000 * MIB, 0)
    after = memory.estimate(dense_8b, s, hw)
    pool = overhead.pool(dense_8b, s)
    assert after.device("gpu0").overhead == 700 * MIB + pool
    assert after.device("gpu1").overhead == overhead.DEFAULT["dense"] + pool
    assert not after.gpu_overhead_learned
    one = dataclasses.replace(hw, gpus=gpus[:1])
    assert memory.estimate(dense_8b, s, one).gpu_overhead_learned


def test_a_measurement_keeps_its_gpu_peaks_through_json():
    m = _run(S(n_ctx=512), [GpuPeak("CUDA0", "NVIDIA H200", "580.95.05", 123, "device")], {})
    again = Measurement.from_dict(m.to_dict())
    assert again.gpu_peaks == m.gpu_peaks and isinstance(again.gpu_peaks[0], GpuPeak)


def test_the_engine_reports_and_does_not_learn():
    """The engine package reports each GPU's peak; learning is the memory layer's, called by who ran it."""
    root = Path(engine.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "overhead" not in (node.module or "") and all(a.name != "overhead" for a in node.names), path


def test_the_default_is_learned_from_runs_it_does_not_check(demo_model, tmp_path):
    """``overhead.DEFAULT`` is what bench/overhead_holdout.py derives from the learning shapes of the H200's recorded
    peaks; the runs it is checked on (other shapes, flash attention off) taught it nothing."""
    import importlib.util

    bench = Path(__file__).parent.parent / "bench"
    spec = importlib.util.spec_from_file_location("overhead_holdout", bench / "overhead_holdout.py")
    holdout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(holdout)
    recorded = json.loads((bench / "gpu_results.json").read_text())["peaks"]["rows"]
    rows = holdout.priced_rows(recorded, tmp_path, demo_model)
    chosen = holdout.split(rows, "chosen")
    assert chosen["default"] == overhead.DEFAULT
    taught = set(chosen["learn"])
    assert all(f"{r['shape']} / {r['settings']}" not in taught for r in chosen["held_out"])
    assert {r["shape"] for r in chosen["held_out"]} >= {"gemma3-4b", "gpt-oss-20b", "deepseek-v2-lite"}
    assert any(r["settings"] == "all, FA off" for r in chosen["held_out"])


def test_a_llama_cpp_tool_run_reports_its_own_gpu_peak_fake_nvml(fake_nvml, tmp_path):
    """llama-bench and llama-server runs record each GPU's peak as engine children do (a budget is checked on
    them too): the driver lists the tool's process with 2 GiB; the tool runs until the driver has been asked."""
    nvml = fake_nvml([("NVIDIA H200", "GPU-aaaa")], [9000 * MIB], [[]])
    asked = tmp_path / "asked"

    def listed(handle: int) -> list[Any]:
        children = psutil.Process().children(recursive=True)
        if children:
            asked.touch()
        return [SimpleNamespace(pid=c.pid, usedGpuMemory=2048 * MIB) for c in children]

    nvml.nvmlDeviceGetComputeRunningProcesses = listed
    tool = f"import os\nwhile not os.path.exists({str(asked)!r}): os.sched_yield()"
    code, _, err, _, gpus, _ = external._run([sys.executable, "-c", tool], timeout=60)
    assert code == 0, err
    assert gpus == [GpuPeak("CUDA0", "NVIDIA H200", "580.95.05", 2048 * MIB, "process")]
    assert nvml.open == 0
