"""Fetching the source of llama.cpp's reference tools: only llama-cpp-python from source (never the build tools),
and one clear line when the package index cannot be reached."""

from __future__ import annotations

import pytest

from autotune.engine import reference


def test_an_unreachable_package_index_is_one_clear_line(tmp_path, monkeypatch):
    # pip's configuration (mirrors, find-links) is left out, and its index is a closed port on loopback
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(reference.BuildError) as caught:
        reference._source(tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"could not download the llama-cpp-python {reference.engine_version()} source")
    assert message.endswith("the package index could not be reached")


def test_pip_reason_names_pips_own_error_otherwise():
    stderr = "Looking in indexes: x\nERROR: Could not find a version that satisfies the requirement y==1\n"
    assert reference._pip_reason(stderr) == "Could not find a version that satisfies the requirement y==1"
