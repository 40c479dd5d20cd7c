#!/usr/bin/env bash
# Device check for issue 18 (generation that fills the GPU), in one go on a lent CUDA machine:
#   1. the CUDA tests of greedy equality: bucketed batches, batch_size="auto" and the static-cache +
#      torch.compile path give the one-prompt-at-a-time texts (tests/test_generation_bucketing.py),
#      with the LM tests beside them (tests/knowledge/test_lm.py);
#   2. benchmarks/bench_generation.py --device cuda: texts/s of SmolLM2-135M and Qwen2.5-1.5B shapes
#      (random weights, bf16, 256-token prompts, 96 new tokens) at batch 16 / 256 / 256 static+compile /
#      1024 / auto, each beside plain model.generate at batch 256 of the same run.
# Runs with the machine's own python3 (torch + transformers + pytest preinstalled) and the repo's src/
# on PYTHONPATH; nothing is installed. Writes its logs and JSON to $OUT (default ./gpu_check_out).
# Budget: about 5 minutes on an H200 (the compile of the static path is the slow part).
#
#   bash benchmarks/gpu_check.sh            # on the device machine, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
  echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) code $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.log"

rc=0
echo "== CUDA tests"
timeout 240 "$PY" -m pytest -q -p no:warnings -p no:cacheprovider -rs \
  tests/test_generation_bucketing.py tests/knowledge/test_lm.py 2>&1 | tee "$OUT/tests.log" | tail -25
t=${PIPESTATUS[0]}; [ "$t" -ne 0 ] && rc=$t
grep -q "needs a CUDA device" "$OUT/tests.log" && { echo "CUDA tests were SKIPPED: no CUDA here"; rc=1; }

echo "== bench_generation.py --device cuda"
timeout 420 "$PY" benchmarks/bench_generation.py --device cuda --json "$OUT/bench_generation_cuda.json" 2>&1 \
  | grep -v "Warning\|warn(" | tee "$OUT/bench_generation_cuda.log"
t=${PIPESTATUS[0]}; [ "$t" -ne 0 ] && rc=$t
echo "gpu_check rc=$rc (logs in $OUT)"
exit "$rc"
