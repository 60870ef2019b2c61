"""Settings: the engine's rules as contradictions, and faithful round trips."""

import pytest

from autotune.search.config import TunedRecord
from autotune.vocabulary.errors import SettingsError
from autotune.vocabulary.settings import Settings, coerce, row_bytes


def test_defaults_have_no_problems():
    assert Settings().problems() == []


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"n_ubatch": 1024, "n_batch": 512}, "n_ubatch (1024) > n_batch (512)"),
        ({"type_v": "q8_0"}, "quantized V cache"),
        ({"type_k": "q3_k"}, "unknown type_k"),
        ({"n_ctx": 0}, "n_ctx must be at least 1"),
    ],
)
def test_contradictions(changes, fragment):
    s = Settings().replace(**changes)
    assert any(fragment in p for p in s.problems())
    with pytest.raises(SettingsError):
        s.check()


def test_gpu_layers_on_cpu_only_build():
    assert Settings(n_gpu_layers=10).problems(can_offload=False)
    assert not Settings(n_gpu_layers=10).problems(can_offload=True)


def test_quantized_v_with_flash_attention_is_fine():
    assert Settings(type_k="q8_0", type_v="q8_0", flash_attn=True).problems() == []


def test_round_trip_and_coercion():
    s = Settings(n_ctx=8192, flash_attn=True, type_k="q4_0", type_v="q4_0", use_mmap=False)
    assert Settings.from_dict(s.to_dict()) == s
    assert coerce("flash_attn", "on") is True and coerce("use_mmap", "off") is False
    assert coerce("n_threads", "3") == 3
    with pytest.raises(SettingsError):
        coerce("n_threads", "three")
    with pytest.raises(SettingsError):
        Settings.from_dict({"n_ctxx": 5})


def test_row_bytes_follow_ggml_block_sizes():
    assert row_bytes("f16", 128) == 256
    assert row_bytes("q8_0", 128) == 4 * 34
    assert row_bytes("q4_0", 128) == 4 * 18


def test_llama_kwargs_use_ggml_type_ids():
    kw = Settings(type_k="q8_0", type_v="f16").llama_kwargs()
    assert (kw["type_k"], kw["type_v"]) == (8, 1)



@pytest.mark.engine
def test_a_knob_is_its_table_entry_op_offload():
    """op_offload was added as one table entry: the engine's context parameter of that name, every export's
    spelling (or its note) and what it changes, all from the table (its search domain: test_space)."""
    from autotune.output import export
    from autotune.vocabulary import flags, knobs
    from conftest import run_python

    off = Settings(op_offload=False)
    assert "--no-op-offload" in flags.server_flags(off, "m.gguf")
    assert "--no-op-offload" not in flags.server_flags(Settings(), "m.gguf")
    bench = flags.bench_flags(off, "m.gguf")
    assert bench[bench.index("-nopo") + 1] == "1"
    assert flags.parse_server_flags(flags.server_flags(off, "m.gguf")).settings.op_offload is False
    assert "--no-op-offload" in export.render(TunedRecord(off, {"path": "m.gguf"}, {}), "ollama")
    k = knobs.BY_NAME["op_offload"]
    assert k.moves == ("prefill",) and not k.cache and k.host_only and k.memory
    code = ("import json\nfrom autotune.engine.native import context_params\nfrom autotune.vocabulary.settings import Settings\n"
            "print(json.dumps([context_params(Settings(op_offload=v)).op_offload for v in (True, False)]))")
    assert run_python(code) == [True, False]


def test_settings_fields_are_the_knob_table():
    """Settings is written out for the type checker; the knob table stays the one truth: same names in the same
    order, each field's type the knob's kind, each default the knob's."""
    import dataclasses
    import typing

    from autotune.vocabulary import settings as settings_module
    from autotune.vocabulary.knobs import KNOBS

    kinds = {"int": int, "float": float, "bool": bool, "str": str, "path": typing.Optional[str]}
    hints = typing.get_type_hints(Settings, vars(settings_module))
    fields = dataclasses.fields(Settings)
    assert [f.name for f in fields] == [k.name for k in KNOBS]
    for f, k in zip(fields, KNOBS):
        assert hints[f.name] == kinds[k.kind], f.name
        assert getattr(Settings(), f.name) == k.default_value(), f.name
