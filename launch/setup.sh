#!/usr/bin/env bash
# Create .venv with egrpo's CPU stack; a no-op when it is already there. GPU users: see README "Install".
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CONSTRAINT="$PWD/launch/constraints-cpu.txt" DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
if ! python -c "import egrpo, ray, deepspeed, diffusers, peft, pytest" 2>/dev/null; then
  echo "setting up .venv (CPU torch and the Ray/DeepSpeed/diffusers stack; about 2 minutes the first time)"
  pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
  pip install -q -e '.[test]' 2>&1 | grep -v "is ignored" || true
fi
python -c "import torch, importlib.util as u; assert not u.find_spec('torchvision'), 'torchvision breaks diffusers on CPU torch'"
python -c "import egrpo, ray, deepspeed, diffusers, peft, pytest" || { echo "setup failed: see pip output above"; exit 1; }
