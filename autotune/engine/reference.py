"""llama.cpp's own tools (llama-server, llama-bench, llama-fit-params), built from the very source the installed
llama-cpp-python vendors: the binaries exports are proven against, and external engines for a study.

They are built once and cached like the catalog models, keyed by the engine version and the build flags:
the source distribution comes from the package index (``pip download``), its ``vendor/llama.cpp`` is built
with CMake for this CPU. About 6 minutes on 2 cores the first time; nothing after that.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from ..facts.catalog import cache_dir
from ..vocabulary.errors import AutotuneError

TOOLS = ("llama-server", "llama-bench")
FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)


class BuildError(AutotuneError):
    """The reference tools could not be fetched or built."""


def engine_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def tool_dir(flags: tuple[str, ...] = FLAGS) -> Path:
    key = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:8]
    return cache_dir() / "llama.cpp" / f"{engine_version()}-{key}"


def tool(name: str, flags: tuple[str, ...] = FLAGS, quiet: bool = True) -> Path:
    """The path of ``name`` (one of TOOLS or llama-fit-params), built first if it is not cached yet."""
    path = tool_dir(flags) / name
    if not path.exists():
        build((name,), flags, quiet)
    return path


def build(targets: tuple[str, ...] = TOOLS, flags: tuple[str, ...] = FLAGS, quiet: bool = True) -> Path:
    """Build ``targets`` from the vendored source into the cache; returns the directory holding them."""
    out = tool_dir(flags)
    missing = [t for t in targets if not (out / t).exists()]
    if not missing:
        return out
    ours = Path(sys.executable).parent / "cmake"  # the test extra's, beside this Python
    cmake = str(ours) if ours.exists() else shutil.which("cmake")
    if cmake is None:
        raise BuildError("building llama.cpp's tools needs cmake (pip install cmake)")
    work = cache_dir() / "llama.cpp" / "src" / engine_version()
    source = _source(work)
    build_dir = work / f"build-{out.name}"
    jobs = str(os.cpu_count() or 2)
    run = [
        [cmake, "-S", str(source), "-B", str(build_dir), *flags],
        [cmake, "--build", str(build_dir), "-j", jobs, "--target", *missing],
    ]
    for argv in run:
        done = subprocess.run(argv, capture_output=quiet, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout or "").strip().splitlines()[-1:] if quiet else []
            raise BuildError(f"building llama.cpp's {', '.join(missing)} failed: {' '.join(tail) or argv[1]}")
    out.mkdir(parents=True, exist_ok=True)
    for t in missing:
        shutil.copy2(build_dir / "bin" / t, out / t)
    return out


def _pip_reason(stderr: str) -> str:
    """Why pip failed, in a few words: the index unreachable, else pip's own last error line."""
    if re.search(
        r"NewConnectionError|Connection refused|Failed to establish|Name or service not known|"
        r"Temporary failure in name resolution|Network is unreachable|timed out",
        stderr,
    ):
        return "the package index could not be reached"
    errors = [ln.strip() for ln in stderr.splitlines() if ln.startswith("ERROR:")]
    lines = errors or [ln.strip() for ln in stderr.splitlines() if ln.strip()] or ["pip gave no reason"]
    return lines[-1].removeprefix("ERROR: ")


def _source(work: Path) -> Path:
    """``vendor/llama.cpp`` of the installed engine's source distribution, downloaded and unpacked once."""
    source = work / "llama.cpp"
    if (source / "CMakeLists.txt").exists():
        return source
    work.mkdir(parents=True, exist_ok=True)
    version = engine_version()
    sdist = work / f"llama_cpp_python-{version}.tar.gz"
    # "--no-binary llama-cpp-python", never ":all:": that applies to the build tools pip installs to read the
    # sdist's metadata too, and pip then compiles CMake from source (half an hour on 2 cores).
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        "llama-cpp-python",
        "--retries",
        "2",
        "--timeout",
        "30",
        f"llama-cpp-python=={version}",
        "-d",
        str(work),
    ]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0 or not sdist.exists():
        raise BuildError(
            f"could not download the llama-cpp-python {version} source distribution from the package "
            f"index (pip download): {_pip_reason(done.stderr)}"
        )
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    skip = tuple(prefix + d for d in ("models/", "docs/", "tests/", "media/"))
    tmp = work / "unpacking"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and not m.name.startswith(skip)]
        tar.extractall(tmp, members=members, filter="data")
    (tmp / prefix).rename(source)
    shutil.rmtree(tmp, ignore_errors=True)
    return source
