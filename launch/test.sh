#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU, real local Ray and DeepSpeed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
. launch/env.sh
python -m pytest -q tests "$@"
