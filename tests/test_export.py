"""Exports: every format reads the same Settings, and the llama-server flags parse back exactly."""

import json
import shlex

import pytest

from autotune import export
from autotune.errors import ConfigError
from autotune.settings import Settings

TUNED = Settings(n_ctx=8192, n_gpu_layers=0, n_threads=2, n_threads_batch=2, n_batch=1024, n_ubatch=256,
                 flash_attn=True, type_k="q8_0", type_v="q8_0", swa_full=False, use_mmap=False, use_mlock=True)


def config(s: Settings = TUNED) -> dict:
    return export.build_config(s, {"path": "/m/model.gguf", "sha256": "ab" * 32, "architecture": "llama"},
                               {"engine_version": "0.3.36", "backend": "cpu", "fingerprint": "x"})


@pytest.mark.parametrize("s", [TUNED, Settings(), Settings(n_ctx=2048, swa_full=True, offload_kqv=False),
                               TUNED.replace(draft_model="/m/draft.gguf", draft_max=4, draft_gpu_layers=0)])
def test_llama_server_flags_round_trip(s):
    line = export.render(config(s), "llama-server")
    model, back = export.parse_server_flags(shlex.split(line))
    assert model == "/m/model.gguf"
    assert back == s


def test_unknown_server_flag_is_refused():
    with pytest.raises(Exception, match="unknown llama-server flag"):
        export.parse_server_flags(["llama-server", "--frobnicate"])


def test_formats_carry_the_settings():
    c = config()
    kobold = export.render(c, "koboldcpp")
    assert "--contextsize 8192" in kobold and "--quantkv 1" in kobold and "--flashattention" in kobold
    ollama = export.render(c, "ollama")
    assert "PARAMETER num_ctx 8192" in ollama and "OLLAMA_KV_CACHE_TYPE=q8_0" in ollama
    lm = json.loads(export.render(c, "lmstudio"))["load"]
    assert lm["contextLength"] == 8192 and lm["llamaKCacheQuantizationType"] == "q8_0" and lm["tryMmap"] is False
    py = export.render(c, "python")
    assert "type_k=8" in py and "n_ctx=8192" in py


def test_draft_flags():
    c = config(TUNED.replace(draft_model="/m/d.gguf", draft_max=8, draft_gpu_layers=3))
    assert "-md /m/d.gguf --draft-max 8 --draft-min 0 -ngld 3" in export.render(c, "llama-server")
    assert "--draftmodel /m/d.gguf --draftamount 8 --draftgpulayers 3" in export.render(c, "koboldcpp")
    assert json.loads(export.render(c, "lmstudio"))["prediction"]["draftModel"] == "/m/d.gguf"


def test_config_json_round_trip(tmp_path):
    p = tmp_path / "tuned.json"
    p.write_text(export.render(config(), "json"))
    loaded = export.load_config(p)
    assert export.settings_of(loaded) == TUNED and loaded["schema"] == export.SCHEMA_VERSION


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not an autotune config"),
        (json.dumps({"schema": 99, "settings": {}}), "newer than this autotune"),
        (json.dumps({"schema": 1, "settings": {"n_ubatch": 2048, "n_batch": 512}}), "invalid settings"),
        (json.dumps({"schema": 1, "settings": {"bogus": 1}}), "invalid settings"),
    ],
)
def test_bad_config_files(tmp_path, text, fragment):
    p = tmp_path / "c.json"
    p.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        export.load_config(p)


def test_exported_kwargs_load_and_run_in_a_real_llama(demo_model):
    """The python export is what a user pastes: it must construct a working Llama."""
    from llama_cpp import Llama

    s = TUNED.replace(n_ctx=512, use_mlock=False)
    llm = Llama(**export.llama_kwargs(s, str(demo_model)), verbose=False)
    out = llm("The capital of France is", max_tokens=4, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    assert llm.n_ctx() == 512
    llm.close()


def test_python_export_with_a_draft_wires_it(tiny_model):
    s = Settings(n_ctx=256, n_threads=1, n_threads_batch=1, draft_model=str(tiny_model), draft_max=2)
    c = config(s)
    c["model"]["path"] = str(tiny_model)
    code = export.render(c, "python")
    assert "logits_all=True" in code and "draft_model=draft" in code
    scope: dict = {}
    exec(code, scope)  # the pasted snippet builds a real Llama with a real draft
    llm = scope["llm"]
    assert llm("def f(x):", max_tokens=4, temperature=0.0)["usage"]["completion_tokens"] >= 1
    llm.close()
