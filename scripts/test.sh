#!/usr/bin/env bash
# Installs diffusekit with its test extras into ./.venv (from nothing) and runs the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "test.sh: $*"; }
if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv/"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: on this machine 2.13.0 is a local CPU wheel; a bare `torch` would pull CUDA.
say "installing torch 2.13.0, then diffusekit with the test extras (diffusers, transformers, ...): a few minutes the first time"
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
python -m pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
# k-diffusion's own sampling.py is the reference of tests/core/test_samplers_kdiffusion.py; its package
# requires a training stack (torchvision, kornia, wandb, clip, ...) that the test never imports: no deps.
python -m pip install -q --no-deps "k-diffusion==0.1.1.post1" 2>&1 | grep -v '^WARNING: Location' || true
# The web UI test drives Debian's Chromium through Playwright (never `playwright install`: it downloads
# a browser). Installed when we are root with apt; without it that one test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # DEBCONF_NOWARNINGS: without apt-utils, debconf warns that it delays package configuration (harmless).
  say "installing Debian's chromium for the browser test (apt-get)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get install -y -qq chromium >/dev/null) \
    || echo "note: could not install chromium; the browser test will skip" >&2
fi
python -c "import diffusekit, torch; print('diffusekit ready, torch', torch.__version__)"
set +e
python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when a selection matched no test; treat that as failure too, loudly.
if [ $rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit $rc
