# Environment for CPU runs and tests: offline model loading, no telemetry, caches under /tmp, one thread per
# process (2-core machines). Sourced by toy.sh and test.sh.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled \
  WANDB_MODE="${WANDB_MODE:-offline}" WANDB_CACHE_DIR=/tmp/egrpo-cache/wandb WANDB_CONFIG_DIR=/tmp/egrpo-cache/wandb-cfg \
  DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" TORCH_EXTENSIONS_DIR=/tmp/egrpo-cache/torch_extensions \
  TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MASTER_ADDR=127.0.0.1
