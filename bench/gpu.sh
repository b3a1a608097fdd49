#!/usr/bin/env bash
# Every GPU figure in docs/train.md, in one run on one GPU (each part time-limited; logs in OUT).
#
#   bench/gpu.sh CHECKPOINT DATA OUT
#
# CHECKPOINT: a Qwen2.5-0.5B folder. Without the real weights (an offline GPU machine), make one
# with the real shapes and random weights first: python bench/random_checkpoint.py --like DIR --out CK
# (speed does not depend on the weights' values; accuracy figures then mean nothing).
set -u
CK=$1 DATA=$2 OUT=$3
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
part() {  # part NAME SECONDS COMMAND...: runs it, its output into OUT/NAME.txt and on screen
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T)): $*"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  grep -v "Loading weights\|it/s\]$\|FutureWarning\|return forward_call" "$OUT/$name.txt" | tail -n 40
  echo "== $name: exit $rc"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
part train_step 90 $PY bench/train_step.py --model "$CK" --device cuda --dtype bfloat16 --batch 16 --context 512 --steps 8 --warmup 2
part tests 130 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_model.py::test_cuda_bfloat16_matches_cpu_float32 tests/test_loss.py::test_restricted_vocabulary_on_cuda
part train 120 $PY train.py --model "$CK" --data "$DATA" --rank 8 --steps 300 --out /tmp/gpu-train --no-progress
cp /tmp/gpu-train/summary.json "$OUT/train_summary.json" 2>/dev/null
part forecast 120 $PY bench/forecast.py --model "$CK" --data "$DATA" --device cuda --dtype bfloat16 --modes free,restricted --cuda-graph
part decode_step 70 $PY bench/decode_step.py --model "$CK" --device cuda --dtype bfloat16 --batch 20 --past 600
part decode_step_b1 50 $PY bench/decode_step.py --model "$CK" --device cuda --dtype bfloat16 --batch 1 --past 600
