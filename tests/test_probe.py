"""The probe: a Hardware value from this machine, stable JSON, and constructed machines for the rest."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import psutil

from autotune.engine import bundled
from autotune.facts.probe import GPU, Hardware, probe


def test_probe_this_machine():
    hw = probe(bundled, measure_bandwidth=True)
    assert hw.logical_cores == psutil.cpu_count() and 1 <= hw.physical_cores <= hw.logical_cores
    assert hw.ram_total == psutil.virtual_memory().total and 0 < hw.ram_available <= hw.ram_total
    assert hw.backend in ("cpu", "cuda", "metal", "vulkan", "hip", "sycl", "gpu")
    assert hw.engine_version == "0.3.36"
    assert hw.bandwidth_gbs and hw.bandwidth_gbs > 0.5
    if not hw.gpus:
        assert any("NVML" in n for n in hw.notes)  # an absent source is said, not skipped silently


def test_json_round_trip_and_stable_fingerprint():
    hw = probe(bundled, measure_bandwidth=False)
    data = json.loads(json.dumps(hw.to_dict()))
    assert data["schema"] == 1 and data["fingerprint"] == hw.fingerprint()
    back = Hardware.from_dict(data)
    assert back == hw
    # the engine build the caller handed in prices memory here; it is no fact of the record (nor of equality)
    assert hw.build is bundled and back.build is None and "build" not in data
    # free memory changes from minute to minute; the fingerprint must not
    assert dataclasses.replace(hw, ram_available=1).fingerprint() == hw.fingerprint()


def test_fake_gpu_offload_needs_a_matching_build():
    gpu = GPU(index=0, name="Fake 8G", backend="cuda", vram_total=8 * 2**30, vram_free=7 * 2**30)
    cpu_build = Hardware("cpu", 4, 8, 2**34, 2**33, gpus=(gpu,), backend="cpu", can_offload=False)
    cuda_build = dataclasses.replace(cpu_build, backend="cuda", can_offload=True)
    vulkan_build = dataclasses.replace(cpu_build, backend="vulkan", can_offload=True)
    assert cpu_build.offload_gpus == () and vulkan_build.offload_gpus == ()
    assert cuda_build.offload_gpus == (gpu,)
    assert cuda_build.fingerprint() != cpu_build.fingerprint()


def test_probe_cli_json():
    done = subprocess.run([sys.executable, "-m", "autotune.cli", "probe", "--json", "--no-bandwidth"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    for key in ("cpu_model", "physical_cores", "logical_cores", "ram_total", "ram_available", "gpus", "backend",
                "can_offload", "cpu_features", "bandwidth_gbs", "notes", "fingerprint", "schema"):
        assert key in data
