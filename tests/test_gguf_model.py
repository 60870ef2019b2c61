"""GGUF facts: exact numbers from the real demo model, and one clear ModelError for every bad file."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autotune.facts.gguf_model import read_facts
from autotune.vocabulary.errors import ModelError
from autotune.vocabulary.settings import Settings


def write_mini(path: Path) -> Path:
    """A tiny but complete GGUF model header + tensors (10-token vocab), cheap enough to fuzz."""
    w = GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(10)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_real_model_facts(demo_model):
    f = read_facts(demo_model)
    assert (f.architecture, f.n_layer, f.n_embd, f.n_head, f.n_ctx_train) == ("llama", 30, 576, 9, 8192)
    assert set(f.n_head_kv) == {3} and f.head_dim_k == f.head_dim_v == 64
    assert (f.vocab_type, f.n_vocab, f.bos_id, f.eos_id) == ("gpt2", 49152, 1, 2)
    assert f.file_type == "Q4_1"
    assert f.tied_embeddings and not f.uses_swa
    # exact tensor-table bytes: every byte of weights is accounted to a layer, the embedding or the output
    assert sum(f.layer_bytes) + f.token_embd_bytes + f.output_bytes == f.weight_bytes
    assert len(set(f.layer_bytes)) == 1 and f.layer_bytes[0] == 2_216_448
    assert f.weight_bytes < f.file_size < f.weight_bytes + 8 * 2**20  # the rest is header and vocab


def test_mini_model_reads(tmp_path):
    f = read_facts(write_mini(tmp_path / "mini.gguf"))
    assert f.n_vocab == 10 and f.n_layer == 1 and f.n_head_kv == (1,)
    assert f.layer_bytes == (8 * 8 * 2,) and f.token_embd_bytes == 10 * 8 * 4


def test_the_default_context_is_the_knob_tables_within_the_trained_one(tmp_path):
    """One rule for every command that is not told a context: the n_ctx default, or less where the model was
    trained for less (unknown: the default)."""
    f = read_facts(write_mini(tmp_path / "mini.gguf"))
    assert f.default_ctx == 256
    assert dataclasses.replace(f, n_ctx_train=131072).default_ctx == Settings().n_ctx == 4096
    assert dataclasses.replace(f, n_ctx_train=0).default_ctx == 4096


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.gguf", "no such file"),
        (lambda d: d, "is a directory"),
        (lambda d: _write(d / "empty.gguf", b""), "empty file"),
        (lambda d: _write(d / "text.gguf", b"hello world, not a model\n"), "not a GGUF file"),
        (lambda d: _write(d / "magic.gguf", b"GGML" + bytes(100)), "not a GGUF file"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path, make, message):
    with pytest.raises(ModelError, match=message):
        read_facts(make(tmp_path))


def test_truncated_header(tmp_path):
    good = write_mini(tmp_path / "good.gguf").read_bytes()
    bad = _write(tmp_path / "cut.gguf", good[:200])
    with pytest.raises(ModelError, match="damaged or truncated"):
        read_facts(bad)


def test_truncated_tensor_data(tmp_path):
    good = write_mini(tmp_path / "good.gguf").read_bytes()
    bad = _write(tmp_path / "cut.gguf", good[:-64])
    with pytest.raises(ModelError, match="truncated"):
        read_facts(bad)


def test_gguf_without_architecture(tmp_path):
    w = GGUFWriter(tmp_path / "noarch.gguf", "llama")
    w.kv_data[0].pop("general.architecture")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="general.architecture"):
        read_facts(tmp_path / "noarch.gguf")


_MINI: bytes | None = None


def _mini_bytes(tmp_path_factory) -> bytes:
    global _MINI
    if _MINI is None:
        _MINI = write_mini(tmp_path_factory.mktemp("mini") / "mini.gguf").read_bytes()
    return _MINI


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_only_model_error_escapes(tmp_path_factory, data):
    """Truncations, byte flips and huge counts: the reader either succeeds or raises ModelError."""
    raw = bytearray(_mini_bytes(tmp_path_factory))
    kind = data.draw(st.sampled_from(["truncate", "flip", "huge"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    else:  # a count or length field overwritten with a huge value
        i = data.draw(st.integers(8, min(len(raw), 400) - 8))
        raw[i : i + 8] = data.draw(st.sampled_from([2**63 - 1, 2**40, 2**32 + 7])).to_bytes(8, "little")
    path = tmp_path_factory.mktemp("fuzz") / "f.gguf"
    path.write_bytes(bytes(raw))
    try:
        read_facts(path)
    except ModelError:
        pass
    finally:
        os.unlink(path)
