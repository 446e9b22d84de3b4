#!/usr/bin/env bash
# Create .venv with egrpo's CPU stack; a no-op when it is already there. GPU users: see README "Install".
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CONSTRAINT="$PWD/launch/constraints-cpu.txt" DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
if ! python -c "import egrpo, ray, deepspeed, diffusers, peft, ftfy, pytest" 2>/dev/null; then
  echo "setting up .venv (CPU torch and the Ray/DeepSpeed/diffusers stack; about 2 minutes the first time)"
  pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
  pip install -q -e '.[test]' 2>&1 | grep -v "is ignored" || true
fi
python -c "import torch, importlib.util as u; assert not u.find_spec('torchvision'), 'torchvision breaks diffusers on CPU torch'"
# The reference tokenisers that tests/test_reward_tokenisation.py compares reward prompts against: open_clip's
# and OpenAI CLIP's own code, without their dependencies (torchvision), off sys.path: only that test reads it.
ref=.venv/share/egrpo-reference
if [ ! -f "$ref/open_clip/tokenizer.py" ] || [ ! -f "$ref/clip/simple_tokenizer.py" ]; then
  pip install -q --no-deps --upgrade --target "$ref" open_clip_torch clip-anytorch 2>&1 |
    grep -v "is ignored" || true
fi
python -c "import egrpo, ray, deepspeed, diffusers, peft, ftfy, pytest" || { echo "setup failed: see pip output above"; exit 1; }
for file in open_clip/tokenizer.py clip/simple_tokenizer.py; do
  [ -f "$ref/$file" ] || { echo "setup failed: no $ref/$file (see pip output above)"; exit 1; }
done
