#!/usr/bin/env bash
# The offload bench (bench/offload_bench.py) on the GPU machine, in one call of about 9 minutes:
#   run(command="bash bench/offload_device.sh", carry=[".gpu"], timeout_s=580)
# after `bash bench/gpu_prepare.sh .gpu` here (.gpu/ in .git/info/exclude). It gets the CUDA llama.cpp
# (.gpu/build.sh: the prebuilt in seconds, else a build), resumes from the committed bench/offload_results.json and
# writes $OUT/offload_results.{json,md} as each run ends. BUDGET_S (default 540) is the time it may take in all.
set -u
start=$(date +%s)
out=${OUT:-/tmp/offload-out}
mkdir -p "$out"
[ -f "$out/offload_results.json" ] || [ ! -f bench/offload_results.json ] || cp bench/offload_results.json "$out/"
if [ ! -f .gpu/build.sh ]; then
  echo "offload_device.sh: no .gpu/ here: bash bench/gpu_prepare.sh .gpu, and carry it" >&2; exit 2
fi
env_lines=$(bash .gpu/build.sh 90) || { echo "offload_device.sh: .gpu/build.sh failed" >&2; exit 1; }
eval "$env_lines"
export PYTHONPATH="$PWD:$PYTHONPATH"  # this working tree's autotune, not the copy prepare.sh took
bin=$(dirname "$(command -v llama-bench)")
echo "llama.cpp tools in $bin; $(( $(date +%s) - start )) s spent getting them" >&2
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv >&2 || true
python3 bench/offload_bench.py --out "$out" --work "${TMPDIR:-/tmp}/offload-work" --donor .gpu/donor-tokenizer.gguf \
  --llama-bin "$bin" --until $(( start + ${BUDGET_S:-540} )) 2>&1 | tee "$out/offload_bench.log"
exit "${PIPESTATUS[0]}"
