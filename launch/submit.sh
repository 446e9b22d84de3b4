#!/usr/bin/env bash
# Submit an egrpo training run to a running Ray cluster (`ray job submit`), print how to follow it and where
# its dashboard is, then follow its logs to the end (or return at once with --no-wait).
#
#   launch/submit.sh [OPTIONS] CONFIG [egrpo train arguments...]
#
#   launch/submit.sh launch/configs/toy-egrpo.yaml --set train.iterations=5
#   launch/submit.sh --address http://head:8265 --no-wait launch/configs/toy-egrpo.yaml --set run.dir=/runs
#
# OPTIONS (before CONFIG)
#   --address URL        the cluster's dashboard / job API (default: $RAY_ADDRESS if it is an http(s) URL,
#                        else http://127.0.0.1:8265)
#   --submission-id ID   the job's id (default: egrpo-<recipe>-<UTC date and time>-<random>)
#   --working-dir DIR    the code uploaded with the job (default: this repository; limit 100 MiB)
#   --runtime-env FILE   (default: launch/runtime_env.yaml: what to leave out of the upload, offline env vars)
#   --no-wait            submit and return; the job keeps running
#   --dry-run            print the `ray job submit` command and exit
#
# The job runs `python -m egrpo.cli train CONFIG ...` in the uploaded working dir on the head node, so CONFIG
# must lie inside it (a path that does not exist here is passed on as a path on the cluster, e.g. /app/...).
# That copy is temporary: without `--set run.dir=...`, a job on a head at 127.0.0.1/localhost writes to this
# checkout's runs/ (the script adds --set run.dir=<working dir>/runs); on other clusters pass a shared folder.
# Exit status: 0 when the job succeeded (or was submitted, with --no-wait), 1 when it failed or was stopped,
# 2 on a usage error.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
default_address=http://127.0.0.1:8265
if [[ ${RAY_ADDRESS:-} == http://* || ${RAY_ADDRESS:-} == https://* ]]; then default_address=$RAY_ADDRESS; fi
address=$default_address
submission_id=""
working_dir=$repo
runtime_env=$repo/launch/runtime_env.yaml
wait=1
dry_run=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "submit.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --address) address=${2:?--address needs a URL}; shift 2 ;;
    --address=*) address=${1#*=}; shift ;;
    --submission-id) submission_id=${2:?--submission-id needs an id}; shift 2 ;;
    --submission-id=*) submission_id=${1#*=}; shift ;;
    --working-dir) working_dir=${2:?--working-dir needs a folder}; shift 2 ;;
    --working-dir=*) working_dir=${1#*=}; shift ;;
    --runtime-env) runtime_env=${2:?--runtime-env needs a file}; shift 2 ;;
    --runtime-env=*) runtime_env=${1#*=}; shift ;;
    --no-wait) wait=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (options go before CONFIG; see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
config=$1; shift

case $address in
  http://*|https://*) ;;
  *) die "--address must be the dashboard's http(s) URL (e.g. http://127.0.0.1:8265), not '$address'" ;;
esac
address=${address%/}
[[ -d $working_dir ]] || die "working dir not found: $working_dir"
[[ -f $runtime_env ]] || die "runtime env file not found: $runtime_env"
working_dir=$(cd "$working_dir" && pwd)

# The entrypoint runs in the uploaded copy of the working dir: name CONFIG relative to it.
if [[ -f $config ]]; then
  config_abs=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
  [[ $config_abs == "$working_dir"/* ]] \
    || die "$config is outside the working dir $working_dir, so the job would not see it (use --working-dir)"
  config=${config_abs#"$working_dir"/}
else
  echo "submit.sh: $config is not a file here; passing it on as a path on the cluster" >&2
fi

# Outputs: the job runs in Ray's temporary copy of the working dir, so a relative run.dir would vanish with it.
# Against a head on this machine, default to this checkout's runs/; elsewhere say that it needs a shared path.
extra=()
if [[ " $* " != *" run.dir="* && " $* " != *" --set=run.dir="* ]]; then
  case $address in
    http://127.0.0.1:*|http://localhost:*|https://127.0.0.1:*|https://localhost:*)
      extra=(--set "run.dir=$working_dir/runs") ;;
    *) echo "submit.sh: no --set run.dir=...: the run's outputs stay in Ray's temporary copy of the working dir" \
            "on the head node; pass a folder every node sees, e.g. --set run.dir=/runs" >&2 ;;
  esac
fi

if [[ -z $submission_id ]]; then
  recipe=$(basename "$config"); recipe=${recipe%.*}
  submission_id="egrpo-${recipe}-$(date -u +%Y%m%d-%H%M%S)-$(printf '%04x' $((RANDOM)))"
fi

cmd=(ray job submit --address "$address" --submission-id "$submission_id" --working-dir "$working_dir"
     --runtime-env "$runtime_env")
[[ $wait == 1 ]] || cmd+=(--no-wait)
cmd+=(-- python -m egrpo.cli train "$config" "$@" "${extra[@]}")

if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
command -v ray >/dev/null || die "the ray CLI is not on PATH (activate the environment with ray[default])"

hint() {
  cat <<EOF

egrpo job $submission_id on $address
  follow the logs   ray job logs --address $address --follow $submission_id
  status            ray job status --address $address $submission_id
  stop              ray job stop --address $address $submission_id
  dashboard         $address/#/jobs/$submission_id   (actors by role: $address/#/actors)
  metrics           $address/#/metrics   (egrpo_* gauges need Prometheus + Grafana: launch/README.md, "Dashboards")
  outputs           <run.dir>/<run.name>/ on the cluster (metrics.jsonl, checkpoints, sample grids)

EOF
}

hint
echo "submitting: python -m egrpo.cli train $config $* ${extra[*]}"
"${cmd[@]}"
[[ $wait == 1 ]] || { hint; exit 0; }

# `ray job submit` exits 0 for a stopped job too: ask for the final status.
status=$(ray job status --address "$address" --log-style record "$submission_id" 2>&1 || true)
if grep -qi "succeeded" <<<"$status"; then
  echo "egrpo job $submission_id succeeded"
  exit 0
fi
echo "egrpo job $submission_id did not succeed:" >&2
echo "$status" | tail -n 5 >&2
hint >&2
exit 1
