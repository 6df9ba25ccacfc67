#!/usr/bin/env bash
# The prepared GPU run: kernels, presets and peers on six real architectures (eager and
# torch.compile, peak memory), sliding-tile attention inside full transformer steps (permute
# once), `diffaccel profile` -- under 8 minutes of an H100 including model construction.
# Section budgets and the plan are in eval/gpu_suite.py (each section skips its remaining rows
# with a note when its budget is spent). Tables: eval/results/gpu_*.md, copied to $OUT with the log.
#
#   bash eval/gpu_suite.sh                         # GPU machine; carry: [".whl"]
#   bash eval/gpu_suite.sh --only kernels,sta      # some sections
#   python eval/gpu_suite.py --smoke --out /tmp/s  # CPU dry run (tests/test_gpu_suite.py runs it)
#
# Prepare .whl/ here (that machine has torch, triton, transformers, no network, no diffusers):
#   pip wheel --no-deps -w .whl diffusers requests tomesd==0.1.3 DeepCache==0.1.1
# The repository is not installed there: a folder of links gives it diffaccel.kernels /
# diffaccel.pipelines as the installed package does (setup.py's package_dir mapping).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_suite.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=$(command -v python3 || command -v python)
if ! "$PY" -c "import diffusers, diffaccel.kernels" 2>/dev/null; then
  SITE=${SITE:-/tmp/diffaccel-site}
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
  fi
  LINKS=/tmp/diffaccel-src
  rm -rf "$LINKS" && mkdir -p "$LINKS/diffaccel"
  for entry in diffaccel/*; do ln -s "$PWD/$entry" "$LINKS/diffaccel/"; done
  ln -s "$PWD/kernels" "$LINKS/diffaccel/kernels"
  ln -s "$PWD/pipelines" "$LINKS/diffaccel/pipelines"
  ln -s "$PWD/assets" "$LINKS/diffaccel/assets"
  export PYTHONPATH="$LINKS:$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch, diffusers, diffaccel; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())" || exit 1
# The suite stops itself by its section budgets (480 s); the timeout is a last resort.
timeout "${SUITE_LIMIT:-540}" "$PY" eval/gpu_suite.py "$@"
status=$?
cp eval/results/gpu_*.md "$OUT"/ 2>/dev/null || true
exit "$status"
