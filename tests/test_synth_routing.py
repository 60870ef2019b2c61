"""Header-only mixture-of-experts files route like a trained model: their token embedding, norms and routers hold
real data in the hole (the experts stay zeros), so a prompt's tokens spread over the experts of every layer. The
same file with zeros (the old files) ties every router: each token goes to the same few experts, and MoE prefill
would be measured on one hot expert set. The engine counts the routing in a child process."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize

from autotune.engine.routing import expert_routing
from autotune.facts import synth

# qwen3moe-like at a toy width: 32 experts of which 4 run per token
SHAPE = synth.Shape(n_layer=3, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, head_dim=64, arch="qwen3moe",
                    n_expert=32, n_expert_used=4, n_ff_exp=128)


@pytest.fixture(scope="module")
def toy_donor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF holding only a made-up 2,048-token vocabulary: enough for files that are read, not run (no
    download, so those tests stay in the fast lane)."""
    path = tmp_path_factory.mktemp("donor") / "donor.gguf"
    w = GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(2048)])
    w.add_token_types([1] * 2048)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def write(path: Path, donor: Path, weight_type: str = "Q4_K", routing: bool = True) -> Path:
    return synth.write_model(path, donor, SHAPE, weight_type, header_only=True, vocab=2048, routing=routing)


@pytest.fixture(scope="module")
def moe(toy_donor: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shape written header-only with the routing data (the default) and without it (all zeros)."""
    d = tmp_path_factory.mktemp("moe")
    return {"routed": write(d / "routed.gguf", toy_donor), "zeros": write(d / "zeros.gguf", toy_donor, routing=False)}


def table(path: Path) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    return [(t.name, t.tensor_type.name, tuple(int(n) for n in t.shape), int(t.data_offset), int(t.n_bytes))
            for t in GGUFReader(path).tensors]


def test_routing_data_keeps_the_header_only_size_and_table(moe: dict[str, Path]) -> None:
    assert moe["routed"].stat().st_size == moe["zeros"].stat().st_size
    assert table(moe["routed"]) == table(moe["zeros"])


def test_routing_data_is_real_where_the_router_reads_and_a_hole_elsewhere(moe: dict[str, Path]) -> None:
    tensors = {t.name: t for t in GGUFReader(moe["routed"]).tensors}
    embd = tensors["token_embd.weight"]
    assert embd.tensor_type.name == "Q4_K"
    values = dequantize(embd.data, embd.tensor_type)
    assert np.isfinite(values).all() and values.std() > 0.1 and abs(values.mean()) < 0.05 * values.std()
    for i in range(SHAPE.n_layer):
        assert (np.asarray(tensors[f"blk.{i}.ffn_norm.weight"].data) == 1).all()
        assert np.asarray(tensors[f"blk.{i}.ffn_up_exps.weight"].data).max() == 0  # experts: still the hole
    routers = [np.asarray(tensors[f"blk.{i}.ffn_gate_inp.weight"].data) for i in range(SHAPE.n_layer)]
    assert all(r.std() > 0 for r in routers) and not np.array_equal(routers[0], routers[1])  # a router per layer
    zeros = {t.name: t for t in GGUFReader(moe["zeros"]).tensors}
    assert np.asarray(zeros["token_embd.weight"].data).max() == 0


def test_routing_data_is_deterministic(toy_donor: Path, moe: dict[str, Path], tmp_path: Path) -> None:
    again = write(tmp_path / "again.gguf", toy_donor)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (again, moe["routed"])]
    assert digest[0] == digest[1]


@pytest.mark.parametrize("weight_type", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                                         "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4"])
def test_random_embedding_is_finite_and_centred_in_every_type(toy_donor: Path, tmp_path: Path,
                                                               weight_type: str) -> None:
    """Block types get random quants with small finite scales (their mins set to centre them), or ``gguf``'s
    quantizer: never NaN or inf, and no direction shared by every token."""
    path = write(tmp_path / "m.gguf", toy_donor, weight_type)
    embd = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    assert embd.tensor_type.name == weight_type
    values = dequantize(embd.data, embd.tensor_type)
    assert np.isfinite(values).all() and values.std() > 0
    assert abs(values.mean()) < 0.05 * values.std()


@pytest.mark.engine
def test_synthetic_moe_routes_over_the_experts_and_zeros_tie(demo_model: Path, tmp_path: Path) -> None:
    """512 tokens of text: with the routing data, at least 90 % of the experts are chosen in every MoE layer; with
    zeros, every token goes to the same experts. The donor is a real tokenizer: the engine loads it."""
    moe = {"routed": write(tmp_path / "routed.gguf", demo_model),
           "zeros": write(tmp_path / "zeros.gguf", demo_model, routing=False)}
    routed = expert_routing(str(moe["routed"]), 512)
    assert (routed.n_tokens, routed.n_expert, routed.n_expert_used) == (512, 32, 4)
    assert sorted(routed.counts) == list(range(SHAPE.n_layer))
    assert all(sum(c) == 512 * 4 for c in routed.counts.values())  # every layer routed every token
    assert routed.min_fraction() >= 0.9, routed.chosen()
    assert routed.counts[0] != routed.counts[1]  # each layer's router spreads the tokens its own way

    tied = expert_routing(str(moe["zeros"]), 512)
    assert sorted(tied.counts) == list(range(SHAPE.n_layer))
    assert max(tied.chosen().values()) == SHAPE.n_expert_used, tied.chosen()
