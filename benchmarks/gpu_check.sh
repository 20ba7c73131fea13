#!/usr/bin/env bash
# The GPU check of issue 12 in one command, under 8 minutes on one H200 (plus issue 23's backbones section, below): extraction images/s, multi-head training
# images/s and TFLOP/s for the five heads (bf16 encoder, bf16 + channels_last decoders), the training loop of
# `deeploc-train experiment=paper_table_multihead features=stream trainer=gpu` against the bare step, and the
# projected wall time of the full Dolos paper table. Needs the project installed (`make install`); extra arguments
# go to benchmarks/bench_gpu.py (e.g. --train-images 256). Results: stdout and gpu_check.json in $OUT or outputs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1
results=${OUT:-outputs}
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
timeout 470 "$PY" benchmarks/bench_gpu.py --json "$results/gpu_check.json" "$@" | tee "$results/gpu_check.txt"

# Backbones (issue 23; about 4 more minutes, skip with BACKBONES=0): one training step of DINOv2 ViT-L/14 at its 518-px
# input (random weights, bf16 encoder) with the same CONV-4 decoder and batch, frozen from cache, frozen streamed,
# LoRA (rank 8 on every block's qkv and proj) and full fine-tuning, their peak GPU memory, and the k-NN probe's time
# per 1000 test images (bank of 65,536 patches). Results: gpu_backbones.txt / .json next to the others.
if [ "${BACKBONES:-1}" != "0" ]; then
  timeout 420 "$PY" benchmarks/bench_backbones.py --device cuda --model vit_large_patch14_dinov2 --layer 20 \
    --image-size 518 --batch 8 --steps 10 --test-images 256 --json "$results/gpu_backbones.json" \
    | tee "$results/gpu_backbones.txt"
fi
