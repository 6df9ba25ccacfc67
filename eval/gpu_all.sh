#!/usr/bin/env bash
# Training session in one command (device time is scarce): train the bundled models, then the
# kernel section of the GPU suite (eval/gpu_suite.sh; the whole suite is its own 8-minute run).
# Every part writes under $OUT; a failing part does not stop the next one.
#   bash eval/gpu_all.sh        # carry: [".whl"]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" /tmp/bin
# The GPU image names its interpreter python3 only.
command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/bin/python
export PATH=/tmp/bin:$PATH
SECONDS=0
timeout "${TRAIN_LIMIT:-420}" bash eval/gpu_train.sh || echo "gpu_train.sh ended with $?"
echo "== training part took ${SECONDS} s"
# If the time limit cut training short, pack every model that finished (it has its report).
for name in tiny-sd tiny-dit tiny-video; do
  dir=${WORK:-/tmp/diffaccel-train}/assets
  if [ ! -f "$OUT/$name.tgz" ] && [ -f "$dir/$name/train_report.json" ]; then
    tar -C "$dir" -czf "$OUT/$name.tgz" "$name" && echo "packed $name after the limit"
  fi
done
timeout "${KERNELS_LIMIT:-170}" bash eval/gpu_suite.sh --only kernels || echo "gpu_suite.sh --only kernels ended with $?"
echo "== all parts took ${SECONDS} s"
ls -l "$OUT"
# Context parallelism needs two GPUs (NCCL cannot put two ranks on one GPU): only then.
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
  timeout "${CP_LIMIT:-300}" python -m torch.distributed.run --standalone --nproc_per_node 2 \
    eval/context_parallel.py --steps 6 > "$OUT/context_parallel.md" 2>&1 || echo "context_parallel.py ended with $?"
else
  echo "one GPU: the 2-GPU context-parallel check (eval/context_parallel.py) is skipped"
fi
