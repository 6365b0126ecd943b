#!/usr/bin/env bash
# The GPU checks of one lent-GPU session, as one script (issue 14, part 1): EVA-g/14 step throughput and MFU in bf16
# and fp16 against the plain timm + open_clip loop, attention / checkpointing / compile variants, the largest batch,
# and the fp16 loss-scale resume test. Each step has its own time cap, and its results are written as soon as they
# exist, so a session that runs out of device time still brings back what finished.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [TOTAL_SECONDS]
#
# Needs python3 with torch (CUDA); packages missing there can be carried as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR [TOTAL_SECONDS]}
total=${2:-540}
mkdir -p "$out"
log="$out/checks.log"
start=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset DS_ACCELERATOR

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$log" 2>&1 || { echo "wheel install failed" | tee -a "$log"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD/tests:${PYTHONPATH:-}

# step NAME CAP_SECONDS COMMAND...: runs within min(CAP, what is left of TOTAL), logs to checks.log
step() {
  local name=$1 cap=$2; shift 2
  local left=$((total - (SECONDS - start)))
  ((left < cap)) && cap=$left
  if ((cap < 20)); then echo "== $name: skipped, ${left}s left" | tee -a "$log"; return; fi
  echo "== $name (cap ${cap}s, t=$((SECONDS - start))s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout --signal=KILL "$cap" "$@" >>"$log" 2>&1
  echo "== $name: rc $? in $((SECONDS - t0))s" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, timm, open_clip, deepspeed; print('torch', torch.__version__, 'timm', timm.__version__,
'open_clip', open_clip.__version__, 'deepspeed', deepspeed.__version__)"; } >>"$log" 2>&1

bench=(python3 benchmarks/pretrain_step.py --device cuda --size giant --steps 4 --rounds 3 --warmup 2)
step bf16-b32 170 "${bench[@]}" --precision bf16 --batch 32 --variants eager sdpa+ckpt sdpa --breakdown --profile \
  --json "$out/bf16_b32.json"
step fp16-b32 110 "${bench[@]}" --precision fp16 --batch 32 --variants sdpa eager --json "$out/fp16_b32.json"
step fp16-resume 110 python3 -m pytest -q -p no:cacheprovider -m cuda tests/training/test_fp16_resume_cuda.py
step bf16-b128 100 "${bench[@]}" --precision bf16 --batch 128 --variants sdpa+ckpt sdpa --json "$out/bf16_b128.json"
step bf16-compile 200 "${bench[@]}" --precision bf16 --batch 32 --variants sdpa+compile --json "$out/bf16_compile.json"
echo "== done in $((SECONDS - start))s" | tee -a "$log"
