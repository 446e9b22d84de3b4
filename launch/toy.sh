#!/usr/bin/env bash
# The main job: set up, then E-GRPO on the CPU toy world, on a local Ray. Extra arguments go to `egrpo train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
. launch/env.sh
egrpo train launch/configs/toy-egrpo.yaml "$@"
