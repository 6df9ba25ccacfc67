#!/usr/bin/env bash
# GPU check of diffaccel's attention kernels (correctness + speed table), < 3.5 min on an H100.
# Needs only torch and triton. Writes $OUT/kernels_gpu.md (OUT defaults to ./out) and a log.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
PY=$(command -v python || command -v python3)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# the script skips remaining cases after 150 s; the outer timeout is a last resort
timeout 190 "$PY" eval/gpu_kernels.py --out "$OUT/kernels_gpu.md" --budget 150 2>&1 | tee "$OUT/kernels_gpu.log"
status=${PIPESTATUS[0]}
cat "$OUT/kernels_gpu.md" 2>/dev/null
exit "$status"
