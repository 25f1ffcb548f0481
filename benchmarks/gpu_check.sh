#!/usr/bin/env bash
# The GPU checks of issue 12 in one go, for a session that has a CUDA machine (under 10 minutes on one H200):
#   1. the CUDA tests of tests/test_devices.py (they skip without a GPU everywhere else)
#   2. benchmarks/bench_devices.py: cpu, torch-cpu and cuda rows, transformers eager bf16 on the same GPU,
#      --gpu-layers and --stream-layers with compute / transfer per token
#   3. a Llama-3-8B-shaped Q4_K_M GGUF (benchmarks/make_8b_shaped.py, LAYERS blocks: default 8 to stay in
#      time; LAYERS=32 for the real shape) decoded on cuda whole, with --gpu-layers and with --stream-layers
# Run from the repository root:  bash benchmarks/gpu_check.sh      (PYTHON=..., OUT=dir, LAYERS=N to change)
# Everything it prints also goes to $OUT/gpu_check.log; bench_devices' JSON to $OUT/devices.json.
set -u -o pipefail
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-benchmarks/out}
LAYERS=${LAYERS:-8}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

{
step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
"$PY" -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'gpus', torch.cuda.device_count()); print('numpy', numpy.__version__)" \
  || { echo "python/torch missing: set PYTHON to an interpreter with torch (CUDA build), numpy, gguf, transformers"; exit 1; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "torch sees no GPU: nothing to check"; exit 1; }

step "1. CUDA tests (tests/test_devices.py)"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py -k "cuda or gpus" -rs

step "2. bench_devices.py (cpu, torch-cpu, cuda, transformers on the same GPU)"
timeout 240 "$PY" benchmarks/bench_devices.py --prompt-tokens 512 --gen-tokens 64 --out "$OUT/devices.json"

step "3. Llama-3-8B-shaped Q4_K_M, $LAYERS blocks"
G8="$OUT/llama3-8b-shaped"
if ! ls "$G8"/*.gguf >/dev/null 2>&1; then  # written once, kept for a rerun
  timeout 240 "$PY" benchmarks/make_8b_shaped.py "$G8" --only gguf --layers "$LAYERS"
fi
GGUF=$(ls "$G8"/*.gguf 2>/dev/null | head -1)
if [ -n "$GGUF" ]; then
  for flags in "" "--gpu-layers $((LAYERS / 2))" "--stream-layers"; do
    echo "--- scratchlm bench --device cuda --dtype bf16 $flags"
    timeout 120 "$PY" -m scratchlm bench -m "$GGUF" --device cuda --dtype bf16 $flags --prompt-tokens 128 --gen-tokens 32
  done
else
  echo "no 8B-shaped GGUF was written"
fi
step "done"
} 2>&1 | tee "$LOG"
