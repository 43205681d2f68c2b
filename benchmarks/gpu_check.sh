#!/usr/bin/env bash
# The GPU measurements of the memory issue, as one script for a lent accelerator (device tool): bf16 CUDA,
#  (1) a LLaMA-2-7B-wide model with 4 blocks: torch.cuda.max_memory_allocated of a Trainer step per method;
#  (2) the whole LLaMA-2-7B shape (32 blocks, random weights) on a GPU capped at 24 GiB, batch 1 × 2048 with
#      activation checkpointing: SparseGrad (default), LoRA, full FT of the same layers — does it train?
# Results (JSON + Markdown) and the log go to $OUT (or ./gpu_results). Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the GPU image lacks (peft 0.21), carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
  python3 benchmarks/trainer_memory.py --device cuda --shape llama7b --layers 4 --blocks-every 1 --dtype bf16 \
    --batch-size 1 --seq-len 512 --warmup 2 --steps 6 --calibration-steps 2 --gram-precision bf16 \
    --methods full,lora,meprop,sparsegrad,sparsegrad-dynamic,sparsegrad-dense,sparsegrad-exact \
    --worker-timeout 300 --output-dir "$OUT" --name gpu_llama7b_width_4blocks
  python3 benchmarks/trainer_memory.py --device cuda --shape llama7b --layers 32 --blocks-every 1 --dtype bf16 \
    --batch-size 1 --seq-len 2048 --warmup 1 --steps 3 --calibration-steps 2 --gram-precision bf16 \
    --activation-checkpointing --memory-limit-gib 24 --methods sparsegrad,lora,full \
    --worker-timeout 300 --output-dir "$OUT" --name gpu_llama7b_24gib
} 2>&1 | tee "$OUT/gpu_check.log"
