"""The tuned config: what a search answers, as a typed record that becomes JSON only where it is saved.

The settings are a ``Settings``; the model, the machine, the measured metrics and the predicted memory are the
records their own layers write; everything else the search found out on the way (study, workload, engine
health, the recommendation's evidence, the K/V quality, the depth sweep, speculation) is kept as ``evidence``
in the order it was added. ``to_json``/``from_json`` are the one spelling of schema 1 (``SCHEMA_VERSION``);
saved records of that schema keep loading, and a newer one is refused with a hint to upgrade.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..vocabulary.errors import ConfigError, ModelError, SettingsError
from ..vocabulary.settings import Settings

SCHEMA_VERSION = 1
# The record's own keys, in the order schema 1 writes them; any other key is evidence.
_OWN = ("schema", "autotune_version", "created", "engine", "hardware", "model", "settings", "metrics", "memory")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class TunedRecord:
    """A tuned config. ``model`` holds path, sha256, architecture and name (and ``moe_layers`` where known);
    ``engine`` defaults to the bundled llama-cpp-python as the hardware record names it."""

    settings: Settings
    model: dict[str, Any]
    hardware: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)  # the memory model's prediction for the settings
    engine: dict[str, Any] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION
    autotune_version: str = __version__
    created: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        if not self.engine:
            self.engine = {
                "name": "llama-cpp-python",
                "version": self.hardware.get("engine_version", ""),
                "backend": self.hardware.get("backend", ""),
            }
        if "fingerprint" not in self.hardware:
            self.hardware = {**self.hardware, "fingerprint": ""}

    def to_json(self) -> dict[str, Any]:
        """The schema-1 record: the record's own keys first, then the evidence."""
        return {
            "schema": self.schema,
            "autotune_version": self.autotune_version,
            "created": self.created,
            "engine": self.engine,
            "hardware": self.hardware,
            "model": self.model,
            "settings": self.settings.to_dict(),
            "metrics": self.metrics,
            "memory": self.memory,
            **self.evidence,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "config") -> TunedRecord:
        """A saved record back; ConfigError (naming ``where``) for anything invalid or newer than this autotune."""
        if not isinstance(data, dict) or "schema" not in data or "settings" not in data:
            raise ConfigError(f"{where}: not an autotune config (no schema/settings)")
        if not isinstance(data["schema"], int) or data["schema"] > SCHEMA_VERSION:
            raise ConfigError(
                f"{where}: config schema {data['schema']} is newer than this autotune understands "
                f"({SCHEMA_VERSION}); upgrade autotune"
            )
        try:
            settings = Settings.from_dict(data["settings"]).check()
        except (SettingsError, TypeError, AttributeError) as e:
            raise ConfigError(f"{where}: invalid settings: {e}") from None
        return cls(
            settings,
            data.get("model") or {},
            data.get("hardware") or {},
            data.get("metrics") or {},
            data.get("memory") or {},
            data.get("engine") or {},
            {k: v for k, v in data.items() if k not in _OWN},
            data["schema"],
            data.get("autotune_version", ""),
            data.get("created", ""),
        )

    @classmethod
    def load(cls, path: str | Path) -> TunedRecord:
        """Read a saved record; ConfigError for a file that is missing, unreadable or not a valid record."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read ({e})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return cls.from_json(data, str(p))

    def moe_layers(self) -> tuple[int, ...] | None:
        """The model's expert layers where the settings need them (the experts of the last N layers are written
        layer by layer): from the model record, else read from its file; None where not needed."""
        s = self.settings
        if not s.experts_by_layer() or s.moe_host_layers:
            return None
        if "moe_layers" in self.model:
            return tuple(self.model["moe_layers"])
        from ..facts.gguf_model import read_facts

        try:
            return read_facts(self.model.get("path", "model.gguf")).moe_layers
        except ModelError as e:
            raise ConfigError(
                f"the experts of the {s.moe_host_from} {s.n_cpu_moe} layers are written layer by "
                f"layer, which needs the model's layers: {e}"
            ) from None
