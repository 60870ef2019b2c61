"""The engine's native libraries as files and as loaded objects: where they are, the order a process loaded its
shared objects in, and what a library carries of the C++ runtime (for ``doctor``).

A build whose compiler's libstdc++ is not the system's (a second GCC picked by CMake, a conda toolchain) links
copies of libstdc++'s locale symbols into the engine's libraries. Such a library works when it loads before the
system libstdc++ and crashes in the vocabulary load's ``std::regex`` when it loads after: hence the order.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def lib_dir() -> Path:
    """Where the engine's libraries are: ``LLAMA_CPP_LIB_PATH``, else the llama_cpp package's own ``lib``."""
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return Path(os.environ["LLAMA_CPP_LIB_PATH"])
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")  # located, not imported: this may run in the tuner
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "lib"


def loaded_libraries() -> list[str]:
    """The shared objects in this process, in the order they were loaded (the dynamic linker's list)."""

    class Info(ctypes.Structure):
        _fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p)]

    names: list[str] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(Info), ctypes.c_size_t, ctypes.c_void_p)

    def each(info: Any, size: int, data: Any) -> int:
        names.append((info.contents.name or b"").decode(errors="replace"))
        return 0

    ctypes.CDLL(None).dl_iterate_phdr(callback_type(each), None)
    return [n for n in names if n]


def position(libraries: list[str], stem: str) -> int | None:
    """Where the first library whose file name starts with ``stem`` ("libllama", "libstdc++") is in the list."""
    return next((i for i, path in enumerate(libraries) if Path(path).name.startswith(stem)), None)


def runtime_first(libraries: list[str]) -> bool:
    """Whether the C++ runtime (libstdc++) was in the process before the engine's libllama."""
    cxx, llama = position(libraries, "libstdc++"), position(libraries, "libllama")
    return cxx is not None and llama is not None and cxx < llama


@dataclass(frozen=True)
class Carried:
    """What one engine library carries of libstdc++: its own locale symbols, and the compiler that built it."""

    path: str
    std_symbols: int  # std:: symbols it defines (exports) itself
    locale: bool  # among them the locale facet ids (std::collate<char>::id ...) the regex crash goes through
    compiler: str  # its .comment section's compiler line ("GCC: (GNU) 13.3.0"), "" if unknown


def carried(path: Path) -> Carried | None:
    """Read ``path`` with binutils (``nm -D``, ``readelf``); None where they are not installed."""
    nm, readelf = shutil.which("nm"), shutil.which("readelf")
    if nm is None:
        return None
    done = subprocess.run([nm, "-D", "--defined-only", "-C", str(path)], capture_output=True, text=True)
    std = [ln for ln in done.stdout.splitlines() if " std::" in ln]
    locale = any(re.search(r"std::(collate|ctype|numpunct|locale)\S*::id\b", ln) for ln in std)
    compiler = ""
    if readelf is not None:
        comment = subprocess.run([readelf, "-p", ".comment", str(path)], capture_output=True, text=True).stdout
        found = re.findall(r"(GCC: .*|clang version .*)", comment)
        compiler = found[-1].strip() if found else ""
    return Carried(str(path), len(std), locale, compiler)


def system_libstdcxx() -> str:
    """The system libstdc++ a plain process would load, resolved (its version is in the file name); "" if
    the linker cache does not say."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
    except OSError:
        return ""
    for line in listing.splitlines():
        if line.strip().startswith("libstdc++.so.6 ") and "=>" in line:
            return str(Path(line.split("=>")[-1].strip()).resolve())
    return ""
