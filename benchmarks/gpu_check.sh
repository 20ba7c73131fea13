#!/usr/bin/env bash
# The GPU check of issue 12 in one command, under 8 minutes on one H200: extraction images/s, multi-head training
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
