"""Exports: every format reads the same Settings, and the llama-server flags parse back exactly."""

import json
import shlex

import pytest
from conftest import run_python

from autotune.output import export
from autotune.search.config import SCHEMA_VERSION, TunedRecord
from autotune.vocabulary import flags
from autotune.vocabulary.errors import ConfigError
from autotune.vocabulary.settings import Settings

TUNED = Settings(n_ctx=8192, n_gpu_layers=0, n_threads=2, n_threads_batch=2, n_batch=1024, n_ubatch=256,
                 flash_attn=True, type_k="q8_0", type_v="q8_0", swa_full=False, use_mmap=False, use_mlock=True)


def config(s: Settings = TUNED) -> TunedRecord:
    return TunedRecord(s, {"path": "/m/model.gguf", "sha256": "ab" * 32, "architecture": "llama"},
                       {"engine_version": "0.3.36", "backend": "cpu", "fingerprint": "x"})


@pytest.mark.parametrize("s", [TUNED, Settings(), Settings(n_ctx=2048, swa_full=True, offload_kqv=False),
                               TUNED.replace(use_extra_bufts=False),
                               TUNED.replace(spec_type="draft-simple", draft_model="/m/draft.gguf", draft_max=4,
                                             draft_p_min=0.75, draft_gpu_layers=0),
                               TUNED.replace(spec_type="ngram-map-k", ngram_n=4, ngram_m=16, ngram_min_hits=2),
                               TUNED.replace(spec_type="ngram-mod", ngram_mod_match=8, ngram_mod_min=4),
                               TUNED.replace(spec_type="draft-mtp", draft_max=2)])
def test_llama_server_flags_round_trip(s):
    text = export.render(config(s), "llama-server")
    assert text.startswith("# written for llama-server of llama.cpp")  # the version the spelling is for
    back = flags.parse_server_flags(shlex.split(text.splitlines()[-1]))
    assert back.model == "/m/model.gguf" and back.other == ()
    assert back.settings == s


def test_a_users_own_command_line_is_read_not_refused():
    """Flags autotune does not tune are kept, older spellings are understood, values it cannot hold stay as
    written: a real command line from someone's start script."""
    cmd = flags.parse_server_flags(shlex.split(
        "llama-server -m ~/models/q.gguf --host 0.0.0.0 --port 8080 --jinja -c 16384 -ngl all -fa auto -t 8 "
        "--no-mmap --mlock --draft-max 8 -md d.gguf -np 4 --temp 0.7"))
    assert cmd.model == "~/models/q.gguf"
    s = cmd.settings
    assert (s.n_ctx, s.n_threads, s.use_mmap, s.use_mlock, s.draft_max, s.draft_model) == (16384, 8, False, True, 8,
                                                                                           "d.gguf")
    assert s.n_parallel == 4  # a serving knob since serve-tune
    assert cmd.other == ("--host", "0.0.0.0", "--port", "8080", "--jinja", "-ngl", "all", "-fa", "auto", "--temp", "0.7")


def test_current_spellings_replace_the_removed_ones():
    """The vendored llama-server refuses --no-mmap, --mlock and --draft-max; it loads a draft with -md but
    drafts nothing without --spec-type."""
    text = export.render(config(TUNED.replace(spec_type="draft-simple", draft_model="/m/d.gguf", draft_max=4)),
                         "llama-server")
    line = shlex.split(text.splitlines()[-1])
    assert "--no-mmap" not in line and "--mlock" not in line and "--draft-max" not in line
    assert line[line.index("-lm") + 1] == "mlock"  # TUNED: no mmap, mlock
    assert line[line.index("--spec-type") + 1] == "draft-simple" and line[line.index("--spec-draft-n-max") + 1] == "4"
    bench = shlex.split(export.render(config(TUNED), "llama-bench").splitlines()[-1])
    assert bench[:2] == ["llama-bench", "-m"] and "-mmp" not in bench and bench[bench.index("-lm") + 1] == "mlock"
    assert bench[bench.index("-fa") + 1] == "on" and bench[bench.index("-t") + 1] == "2" and "-c" not in bench


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
    c = config(TUNED.replace(spec_type="draft-simple", draft_model="/m/d.gguf", draft_max=8, draft_gpu_layers=3))
    assert ("--spec-type draft-simple -md /m/d.gguf --spec-draft-n-max 8 --spec-draft-n-min 0 --spec-draft-p-min 0.0 "
            "-ngld 3" in export.render(c, "llama-server"))
    kobold = export.render(c, "koboldcpp")
    assert "--draftmodel /m/d.gguf --draftamount 8 --draftgpulayers 3" in kobold and "--spec-type" not in kobold
    assert json.loads(export.render(c, "lmstudio"))["prediction"]["draftModel"] == "/m/d.gguf"
    assert "has no draft-model setting; the tuned draft was /m/d.gguf" in export.render(c, "ollama")


def test_ngram_speculation_is_llama_servers_and_a_note_elsewhere():
    c = config(TUNED.replace(spec_type="ngram-map-k4v", ngram_n=4, ngram_m=16))
    assert ("--spec-type ngram-map-k4v --spec-ngram-map-k4v-size-n 4 --spec-ngram-map-k4v-size-m 16 "
            "--spec-ngram-map-k4v-min-hits 1" in export.render(c, "llama-server"))
    for fmt in ("koboldcpp", "ollama", "lmstudio"):
        assert "the tuned config speculates with ngram-map-k4v in llama-server" in export.render(c, fmt), fmt
    assert "Speculative decoding (ngram-map-k4v) was measured in llama-server" in export.render(c, "python")
    plain = export.render(config(), "llama-server")
    assert "--spec" not in plain and "-md" not in plain.split()


def test_config_json_round_trip(tmp_path):
    tuned = config()
    tuned.evidence["recommendation"] = {"verdict": "trial 2 beats the engine defaults", "chosen": "trial 2"}
    p = tmp_path / "tuned.json"
    p.write_text(export.render(tuned, "json"))
    loaded = TunedRecord.load(p)
    assert loaded == tuned and loaded.settings == TUNED and loaded.schema == SCHEMA_VERSION == 1
    assert export.render(loaded, "json") == p.read_text()  # saved, loaded and saved again: the same bytes
    assert list(loaded.to_json()) == ["schema", "autotune_version", "created", "engine", "hardware", "model",
                                      "settings", "metrics", "memory", "recommendation"]


# A schema-1 record as autotune 0.x saved it, before the record was typed: its settings lack knobs added since
# (they load at their defaults) and its evidence keys come back in the order they were written.
VERSION_1 = {
    "schema": 1, "autotune_version": "0.9.0", "created": "2026-11-02T10:00:00+00:00",
    "engine": {"name": "llama-server", "version": "b7100", "backend": "cuda"},
    "hardware": {"physical_cores": 8, "fingerprint": "f00"},
    "model": {"path": "/m/model.gguf", "sha256": "ab" * 32, "architecture": "llama", "name": "tiny"},
    "settings": {"n_ctx": 4096, "n_threads": 8, "n_batch": 1024, "flash_attn": True, "type_k": "q8_0",
                 "type_v": "q8_0"},
    "metrics": {"decode": {"median": 41.0, "n": 6}}, "memory": {"total": 2**30},
    "study": {"name": "s1", "storage": "sqlite:///studies/autotune.db", "objective": "decode"},
    "workload": {"prompt_tokens": 256, "gen_tokens": 32, "reps": 2},
    "recommendation": {"supported": True, "verdict": "trial 4 beats the engine defaults", "chosen": "trial 4"},
    "depth_sweep": [{"depth": 0, "ok": True}],
}


def test_a_version_1_record_still_loads(tmp_path):
    p = tmp_path / "old.json"
    p.write_text(json.dumps(VERSION_1))
    old = TunedRecord.load(p)
    assert old.settings == Settings(n_ctx=4096, n_threads=8, n_batch=1024, flash_attn=True, type_k="q8_0",
                                    type_v="q8_0")
    assert old.engine["name"] == "llama-server" and old.created == VERSION_1["created"]
    assert list(old.evidence) == ["study", "workload", "recommendation", "depth_sweep"]
    again = old.to_json()
    assert {k: v for k, v in again.items() if k != "settings"} == {k: v for k, v in VERSION_1.items()
                                                                    if k != "settings"}
    assert list(again) == list(VERSION_1)  # the same keys in the same order; settings gain the newer knobs only
    assert again["settings"].items() >= VERSION_1["settings"].items()
    assert TunedRecord.from_json(again) == old
    assert "-c 4096 -ngl 0 -t 8" in export.render(old, "llama-server")


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
        TunedRecord.load(p)


# What a user pastes must build a working Llama. It runs in a child process: a native crash (the AMX kernel on
# some Xeons) then fails this test instead of killing pytest. The probe prints the loaded model buffers.
_RUN_SNIPPET = """
import json, sys
from llama_cpp import llama_cpp as C
buffers = []
@C.llama_log_callback
def log(level, text, user_data):
    if b"model buffer size" in text:
        buffers.append(text.decode().split(":")[1].split()[0])
C.llama_log_set(log, None)
{code}
llm.verbose = False
out = llm("def f(x):", max_tokens=4, temperature=0.0)
print(json.dumps({{"tokens": out["usage"]["completion_tokens"], "n_ctx": llm.n_ctx(), "buffers": buffers}}))
"""


@pytest.mark.parametrize("extra_bufts", [True, False])
@pytest.mark.engine
def test_exported_python_loads_and_runs_in_a_real_llama(demo_model, tiny_model, extra_bufts):
    """With extra buffers on (the engine default) on the F16 tiny model, which no known CPU crashes on, and
    off on the real Q4_1 demo model, where the snippet must keep AMX and CPU_REPACK buffers away."""
    model = demo_model if not extra_bufts else tiny_model
    s = TUNED.replace(n_ctx=512, use_mlock=False, use_extra_bufts=extra_bufts)
    c = config(s)
    c.model["path"] = str(model)
    code = export.render(c, "python")
    assert ("use_extra_bufts = False" in code) is (not extra_bufts)
    result = run_python(_RUN_SNIPPET.format(code=code))
    assert result["tokens"] >= 1 and result["n_ctx"] == 512
    if not extra_bufts:
        assert result["buffers"] == ["CPU"]  # mmap off: one plain host buffer, no AMX / CPU_REPACK


def test_no_repack_reaches_every_format():
    c = config(TUNED.replace(use_extra_bufts=False))
    assert "--no-repack" in export.render(c, "llama-server").split()
    for fmt in ("koboldcpp", "ollama", "lmstudio"):
        assert "has no setting we know of for extra buffer types" in export.render(c, fmt), fmt
    assert "--no-repack" not in export.render(config(), "llama-server")
    assert flags.parse_server_flags(["llama-server", "-m", "m.gguf", "-nr"]).settings.use_extra_bufts is False


def test_experts_on_host_reach_every_format():
    c = config(TUNED.replace(n_cpu_moe=12))
    assert "-ncmoe 12" in export.render(c, "llama-server")
    assert "--moecpu 12" in export.render(c, "koboldcpp")
    for fmt in ("ollama", "lmstudio"):
        assert "experts of the first N layers in host memory" in export.render(c, fmt), fmt
    for fmt in ("llama-server", "koboldcpp", "ollama", "lmstudio"):
        assert "moe" not in export.render(config(), fmt).lower(), fmt  # 0 is every tool's default: not written
    assert flags.parse_server_flags(["llama-server", "-m", "m.gguf", "--n-cpu-moe", "3"]).settings.n_cpu_moe == 3


_LOAD_SNIPPET = """
import json
from llama_cpp import llama_cpp as C
buffers = {{}}
@C.llama_log_callback
def log(level, text, user_data):
    if b"model buffer size" in text:
        name, size = text.decode().split(":")[1].split("model buffer size =")
        buffers[name.strip()] = float(size.split()[0])
C.llama_log_set(log, None)
{code}
print(json.dumps({{"n_ctx": llm.n_ctx(), "buffers": buffers}}))
"""


@pytest.mark.engine
def test_exported_python_keeps_experts_in_host_memory(demo_model, tmp_path):
    """A header-only Qwen3-MoE file loads in a real Llama from the pasted code (no tokens are run: zeros for
    weights, and extra buffers on). With --n-cpu-moe 1 the loader overrides the experts of layer 0, and as
    llama.cpp's own override does, sends them to the CPU's buffer types, the repack buffer first: on a CPU alone
    the buffers stay as they were (tests/test_placement.py checks the overridden tensors one by one)."""
    from autotune.facts import synth

    shape = synth.Shape(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, head_dim=64, arch="qwen3moe",
                        n_expert=4, n_expert_used=2, n_ff_exp=256)
    model = synth.write_model(tmp_path / "moe.gguf", demo_model, shape, "Q4_0", header_only=True, vocab=2048)
    runs = {}
    for n in (0, 1):
        c = config(TUNED.replace(n_ctx=512, use_mlock=False, use_mmap=False, use_extra_bufts=True, n_cpu_moe=n))
        c.model["path"] = str(model)
        runs[n] = run_python(_LOAD_SNIPPET.format(code=export.render(c, "python")))["buffers"]
    assert runs[1] == runs[0]


def test_what_a_tool_cannot_spell_is_said_not_dropped():
    s = TUNED.replace(n_ubatch=64, n_threads_batch=1, type_k="q8_0", type_v="f16")
    c = config(s)
    kobold = export.render(c, "koboldcpp")
    assert "KoboldCpp has no setting for n_ubatch: the tuned value was 64" in kobold
    assert "K=q8_0, V=f16 is not written" in kobold and "--quantkv" not in kobold.splitlines()[-1]
    assert "Ollama has no setting for prompt threads (n_threads_batch): the tuned value was 1" in export.render(c, "ollama")
    assert any("n_ubatch" in n for n in json.loads(export.render(c, "lmstudio"))["notes"])
    bench = export.render(c, "llama-bench")
    assert "n_threads_batch=1 are not written" in bench
    for fmt in ("python", "lmstudio", "ollama", "koboldcpp", "llama-server", "llama-bench"):
        assert "written for" in export.render(c, fmt), fmt  # every format says which tool version it targets
