#!/usr/bin/env bash
# The GPU checks of issue 12 in one go, for a session that has a CUDA machine (under 10 minutes on one H200):
#   1. the CUDA tests of tests/test_devices.py (they skip without a GPU everywhere else)
#   2. benchmarks/bench_devices.py: cpu, torch-cpu and cuda rows, transformers eager bf16 on the same GPU and
#      the same weights, --gpu-layers and --stream-layers with compute / transfer per token
#   3. a Llama-3-8B-shaped model (LAYERS blocks, default 8 to stay in time; LAYERS=32 for the whole shape)
#      decoded on cuda whole, with --gpu-layers LAYERS/2 and with --stream-layers
#
# The lent machines' image has torch, transformers, numba and safetensors but neither gguf nor array-api-compat,
# nothing can be downloaded there, and the default model (94 MB) is over the 64 MiB that travels. So:
#   here:   bash benchmarks/gpu_check.sh prepare      (downloads the two wheels into .gpu_carry/, git-ignored)
#   there:  run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_carry"], timeout_s=600)
# Without the default model the benchmark writes random models of its shape with transformers (on the GPU,
# bf16 safetensors): SmolLM2-135M-shaped for step 2, Llama-3-8B-shaped for step 3. PYTHON=..., OUT=dir, LAYERS=N.
set -u -o pipefail
CARRY=.gpu_carry
if [ "${1:-}" = "prepare" ]; then
  PY=${PYTHON:-.venv/bin/python}
  mkdir -p "$CARRY/wheels"
  "$PY" -m pip download --no-deps -q -d "$CARRY/wheels" gguf==0.19.0 array-api-compat==1.16.0
  grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> "$(git rev-parse --git-path info/exclude)"
  ls -l "$CARRY/wheels"
  echo "now: run(command=\"bash benchmarks/gpu_check.sh\", carry=[\"$CARRY\"], timeout_s=600)"
  exit 0
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=${OUT:-benchmarks/out}
LAYERS=${LAYERS:-8}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SITE="$CARRY/site"
if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1 && [ ! -d "$SITE" ]; then
  "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$CARRY"/wheels/*.whl
fi
export PYTHONPATH="$PWD:$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

# A random Llama of a given shape written by transformers (bf16 safetensors + config.json), made on the GPU.
shaped() {  # out_dir vocab dim layers heads kv_heads ffn tied theta ctx
  [ -f "$1/config.json" ] && return 0
  "$PY" - "$@" <<'EOF'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
out, V, D, L, H, K, F, tied, theta, ctx = sys.argv[1:]
cfg = LlamaConfig(vocab_size=int(V), hidden_size=int(D), num_hidden_layers=int(L), num_attention_heads=int(H),
                  num_key_value_heads=int(K), intermediate_size=int(F), tie_word_embeddings=tied == "1",
                  rope_theta=float(theta), max_position_embeddings=int(ctx), bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
with torch.device("cuda"):
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(out)
print("wrote", out, f"{sum(p.numel() for p in m.parameters()) / 1e9:.2f} B parameters")
EOF
}

{
step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
"$PY" -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'gpus', torch.cuda.device_count()); print('numpy', numpy.__version__)" \
  || { echo "python/torch missing: set PYTHON to an interpreter with torch (CUDA build), numpy, transformers"; exit 1; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "torch sees no GPU: nothing to check"; exit 1; }
"$PY" -c "import gguf, array_api_compat" || { echo "gguf / array-api-compat missing: run 'bash benchmarks/gpu_check.sh prepare' here first and carry $CARRY"; exit 1; }

step "1. CUDA tests (tests/test_devices.py)"
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py -k "cuda or gpus" -rs

step "2. bench_devices.py"
MODEL=$("$PY" -c "from scratchlm import assets; print(assets.default_model_path())" 2>/dev/null) || MODEL=
if [ -z "$MODEL" ]; then
  MODEL="$OUT/smollm2-135m-shaped"
  shaped "$MODEL" 49152 576 30 9 3 1536 1 100000 2048  # SmolLM2-135M's shape, random weights
fi
timeout 240 "$PY" benchmarks/bench_devices.py --model "$MODEL" --prompt-tokens 512 --gen-tokens 64 --out "$OUT/devices.json"

step "3. Llama-3-8B-shaped, $LAYERS blocks, bf16"
BIG="$OUT/llama3-8b-shaped-$LAYERS"
shaped "$BIG" 128256 4096 "$LAYERS" 32 8 14336 0 500000 8192
if [ -f "$BIG/config.json" ]; then
  for flags in "" "--gpu-layers $((LAYERS / 2))" "--stream-layers"; do
    echo "--- scratchlm bench --device cuda --dtype bf16 $flags"
    timeout 90 "$PY" -m scratchlm bench -m "$BIG" --device cuda --dtype bf16 $flags --prompt-tokens 128 --gen-tokens 32
  done
else
  echo "no 8B-shaped model was written"
fi
step "done"
} 2>&1 | tee "$LOG"
