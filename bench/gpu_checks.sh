#!/usr/bin/env bash
# Every GPU check of issue #25 in one run, for a session that is lent a GPU machine for a few minutes: the CUDA tests,
# the speed table at the `small` shape (hfgpt against GPT-2, decoding included) and the `gpt2` preset's MFU under
# hfgpt's defaults (bf16 + compile + flash sdpa; target >= 40%). Results go to $OUT (default out/gpu_checks), one file
# per check, and summary.txt lists each check's exit code; a failing check does not stop the others.
#
#   bash bench/gpu_checks.sh            # on the GPU machine, from the repository root
#
# The machine needs hfgpt's dependencies (pip install -e ".[dev]", or wheels carried in when it has no network).
set -uo pipefail
OUT="${OUT:-out/gpu_checks}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

check() {  # check NAME COMMAND...: run it, keep its output in $OUT/NAME.txt and its exit code in summary.txt
    local name=$1
    shift
    local start=$SECONDS
    "$@" > "$OUT/$name.txt" 2>&1
    echo "$name rc=$? seconds=$((SECONDS - start))" | tee -a "$OUT/summary.txt"
}

check device nvidia-smi
check cuda_tests python -m pytest -q tests/test_cuda.py
check speed_small python bench/model_speed.py --device cuda --shapes small --no_memory
check mfu_gpt2 python bench/model_speed.py --device cuda --shapes gpt2 --train_batch 16 --no_generate --no_memory
