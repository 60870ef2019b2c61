"""``doctor``'s look at the environment, for when every engine load dies whatever the settings: then the build
or the process is broken, not a setting. The known case: the engine's libraries carry their own copies of
libstdc++'s locale symbols (a compiler whose libstdc++ is not the system's built them), and a load after the
system libstdc++ is in the process dies where a load before it works (``libs``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any

from . import libs, process

# The child's prelude that brings the system libstdc++ in first, as ``import numpy`` would.
RUNTIME_FIRST = "import ctypes\nctypes.CDLL('libstdc++.so.6', mode=ctypes.RTLD_GLOBAL)\n"


@dataclass
class Diagnosis:
    carried: list[libs.Carried] = field(default_factory=list)  # engine libraries with std:: symbols of their own
    system_libstdcxx: str = ""
    engine_first: str = ""  # "loads", or how the vocabulary load died with the engine's library loaded first
    runtime_first: str = ""  # the same with libstdc++ loaded first

    @property
    def order_fault(self) -> bool:
        """A load after libstdc++ dies where a load before it works."""
        return self.engine_first == "loads" and self.runtime_first != "loads"

    def lines(self) -> list[str]:
        """What doctor prints about the environment."""
        out = [
            f"vocabulary load with the engine's library loaded first (how autotune runs it): {self.engine_first}",
            f"vocabulary load with the system libstdc++ loaded first (as after `import numpy`): {self.runtime_first}",
        ]
        own = [c for c in self.carried if c.locale]
        if self.order_fault:
            for c in own:
                out.append(
                    f"{c.path} defines {c.std_symbols:,} std:: symbols of its own, libstdc++'s locale facet "
                    f"ids among them" + (f" (built by {c.compiler})" if c.compiler else "")
                )
            compiler = next((c.compiler for c in own if c.compiler), "another compiler")
            system = self.system_libstdcxx or "the system's libstdc++"
            out.append(
                f"diagnosis: a toolchain mismatch. The engine was built by {compiler}, whose libstdc++ is not "
                f"{system}; any process that loads the system libstdc++ before libllama (numpy, gguf, sentencepiece "
                "imported first) crashes in the vocabulary load. autotune's engine children load the engine first, "
                "so autotune runs; your own programs must import llama_cpp before anything else. The fix is a build "
                f"with the system's compiler: {rebuild_hint()}"
            )
        elif self.engine_first != "loads":
            out.append(
                "diagnosis: the engine dies loading this model even with its library loaded first: the build "
                "or the file is broken here (not a setting, not the load order)"
            )
        else:
            out.append("diagnosis: no load-order fault: the engine loads this model whichever C++ runtime came first")
        return out


def rebuild_hint() -> str:
    """The rebuild line that makes CMake use the system's compilers (the one on PATH) for C, C++ and CUDA host."""
    gcc, gxx = shutil.which("gcc") or "/usr/bin/gcc", shutil.which("g++") or "/usr/bin/g++"
    return (
        f'CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_C_COMPILER={gcc} -DCMAKE_CXX_COMPILER={gxx} '
        f'-DCMAKE_CUDA_HOST_COMPILER={gxx}" python -m pip install --no-cache-dir --force-reinstall --no-deps '
        "llama-cpp-python"
    )


def diagnose(model_path: str, timeout: float = 120.0) -> Diagnosis:
    """Load ``model_path``'s vocabulary in two children, the engine's library first and the system libstdc++
    first, and read what the engine's libraries carry of libstdc++."""
    request: dict[str, Any] = {"mode": "vocab", "model": model_path}
    d = Diagnosis(system_libstdcxx=libs.system_libstdcxx())
    d.engine_first = _outcome(process.spawn(request, timeout))
    d.runtime_first = _outcome(process.Worker(prelude=RUNTIME_FIRST).ask(request, timeout, last=True))
    if d.order_fault:  # what the libraries carry explains a fault; without one it is no finding (seen on the H200)
        for path in sorted(libs.lib_dir().glob("lib*.so")):
            found = libs.carried(path)
            if found is not None and found.std_symbols:
                d.carried.append(found)
    return d


def _outcome(done: process.Spawned) -> str:
    if done.timed_out:
        return "no answer (killed at the time limit)"
    if done.result is None:
        return done.failure()
    if "error" in done.result:
        return f"refused: {done.result['error']}"
    return "loads"
