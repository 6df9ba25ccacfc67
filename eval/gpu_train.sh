#!/usr/bin/env bash
# Train the three bundled models on one GPU machine in about 6 minutes and pack each
# pipeline folder (with its train_report.json and samples.png) into $OUT/<name>.tgz,
# which unpacks as <name>/...:  tar -C assets -xzf tiny-sd.tgz
#
#   bash eval/gpu_train.sh             # GPU machine: carry .whl/ (diffusers + requests wheels)
#   OUT=/tmp/out DEVICE=cpu SD_MINUTES=1 DIT_MINUTES=1 VIDEO_MINUTES=1 IMAGE_VAE_MINUTES=0.5 VIDEO_VAE_MINUTES=0.5 \
#     EXTRA="--pool 2000 --video-pool 200 --eval-n 16" bash eval/gpu_train.sh   # CPU dry run
#
# That machine has torch, transformers, safetensors, numpy, pillow but no diffusers and no
# network, so diffusers comes from .whl/ into a private --target folder; the repository is
# used from PYTHONPATH, not installed. Each model runs in its own process: one failing
# leaves the others to finish and be packed.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/train.log") 2>&1
set -x
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=${SITE:-/tmp/diffaccel-site}
WORK=${WORK:-/tmp/diffaccel-train}
DEVICE=${DEVICE:-auto}
# Minutes of training per stage (the rest, ~1.5 min, is imports, data and evaluation).
IMAGE_VAE_MINUTES=${IMAGE_VAE_MINUTES:-0.4}
VIDEO_VAE_MINUTES=${VIDEO_VAE_MINUTES:-0.8}  # its colours come last (CPU check: right direction, wrong colour at 250 steps)
SD_MINUTES=${SD_MINUTES:-1.0}
DIT_MINUTES=${DIT_MINUTES:-1.1}
VIDEO_MINUTES=${VIDEO_MINUTES:-1.2}
EXTRA=${EXTRA:-}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
(cd /tmp && python3 -c "import torch, transformers, diffusers; print(torch.__version__, transformers.__version__, diffusers.__version__, torch.cuda.is_available())")  # not from the repo root: its kernels/ shadows the HF `kernels` package
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || true

train() {  # name minutes vae-minutes
  python3 eval/train_bundled.py --model "$1" --minutes "$2" --vae-minutes "$3" \
    --device "$DEVICE" --work "$WORK/checkpoints" --out "$WORK/assets" --samples $EXTRA \
    || echo "TRAINING FAILED: $1"
}
SECONDS=0
train tiny-sd "$SD_MINUTES" "$IMAGE_VAE_MINUTES"
train tiny-dit "$DIT_MINUTES" "$IMAGE_VAE_MINUTES"  # reuses the image VAE trained for tiny-sd
train tiny-video "$VIDEO_MINUTES" "$VIDEO_VAE_MINUTES"
echo "training wall clock: ${SECONDS} s"

set +x
for name in tiny-sd tiny-dit tiny-video; do
  if [ -f "$WORK/assets/$name/train_report.json" ]; then
    tar -C "$WORK/assets" -czf "$OUT/$name.tgz" "$name"
    ls -l "$OUT/$name.tgz"
  else
    echo "NOT PACKED: $name (no train_report.json)"
  fi
done
python3 - "$WORK/assets" <<'EOF'
import json, sys
from pathlib import Path
for report in sorted(Path(sys.argv[1]).glob("*/train_report.json")):
    r = json.loads(report.read_text())
    d = r["denoiser"]
    print(f"== {r['model']}: {d['step']} steps, {d['elapsed_s']:.0f} s, {d.get('steps_per_s') or 0:.1f} steps/s, "
          f"batch {r['batch']}, loss {d['loss']:.4f}; VAE {r['vae']['step']} steps, "
          f"reconstructions {json.dumps(r['vae']['reconstruction_following'])}")
    for split, numbers in r["prompt_following"].items():
        print(f"   {split}: {json.dumps(numbers)}")
    print(f"   chance: {json.dumps(r['chance'])}")
EOF
