#!/usr/bin/env bash
# Installs diffusekit into ./.venv (from nothing) and runs the main job on the shipped `shapes` model,
# offline on the CPU: one image (a PNG carrying its A1111 parameters), the video of its denoising, and
# a sampler comparison grid (Euler + Normal vs DPM++ 2M + Karras, same seed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "quickstart: $*"; }
if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv/"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# torch first and pinned: on this project's machines 2.13.0 is a local CPU wheel; a bare `torch` pulls CUDA.
say "installing torch 2.13.0 (the first time this takes a minute or two)"
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
say "installing diffusekit with the video and plot extras (imageio-ffmpeg, matplotlib)"
python -m pip install -q -e ".[video,plot]" 2>&1 | grep -v '^WARNING: Location' || true
OUT=${OUT:-out/quickstart}
PROMPT="a large red circle on the left, blue background"
say "generating \"$PROMPT\" with the shipped shapes model, and the video of its denoising"
diffusekit generate "$PROMPT" --seed 1 --steps 20 --sampler "DPM++ 2M" --scheduler Karras --cfg-scale 5 \
  --save-process --fps 4 --out "$OUT"
say "comparing Euler + Normal with DPM++ 2M + Karras at the same seed"
diffusekit compare "$PROMPT" --axes pairs --samplers "Euler,DPM++ 2M" --schedulers "Normal,Karras" \
  --steps 20 --cfg-scale 5 --seed 1 --out "$OUT"
say "the parameters stored in the PNG:"
diffusekit info "$OUT"/00000-1.png
