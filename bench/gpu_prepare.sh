#!/usr/bin/env bash
# Prepares the folder taken to the GPU machine (default .gpu; keep it in .git/info/exclude) with the shared recipe,
# ../shared/gpu/prepare.sh. That recipe's donor step still imports the flat module paths the project had before its
# layer packages (autotune.catalog, autotune.gguf_model) and stops there: this then writes the donor tokenizer with
# today's paths and copies the recipe's remaining files, so the folder is whole either way.
# usage, from the project root with the project installed: bash bench/gpu_prepare.sh [DIR]
set -u
out=${1:-.gpu}
shared=$(cd "$(dirname "$0")/../../shared/gpu" && pwd)
if bash "$shared/prepare.sh" "$out"; then exit 0; fi
[ -d "$out/proj/autotune" ] || { echo "gpu_prepare.sh: $shared/prepare.sh failed before its donor step" >&2; exit 1; }
echo "gpu_prepare.sh: writing the donor tokenizer with the layer packages' paths" >&2
python - "$out/donor-tokenizer.gguf" <<'PY' || exit 1
import sys

from gguf import GGUFValueType, GGUFWriter

from autotune.facts import catalog
from autotune.facts.gguf_model import FastReader

r = FastReader(str(catalog.fetch()))  # the demo model (SmolLM2-135M): its 49k-token vocabulary
w = GGUFWriter(sys.argv[1], "llama")
for k, f in r.fields.items():
    if k.startswith("tokenizer."):
        t = f.types[0]
        w.add_key_value(k, f.contents(), t, sub_type=f.types[-1] if t == GGUFValueType.ARRAY else None)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_ti_data_to_file()
w.close()
PY
cp "$shared"/build.sh "$shared"/peak.py "$shared"/segv.c "$out"/
du -sh "$out"
