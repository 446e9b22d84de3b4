#!/usr/bin/env bash
# The checks to run the day a CUDA GPU is lent (one H200: under 8 minutes), from the repository root of an
# environment with the project installed (README, "Install for GPUs"). Nothing is downloaded.
#
#   bash launch/gpu-check.sh                      # on the GPU machine
#   GPU_CHECK_DRY_RUN=1 bash launch/gpu-check.sh  # anywhere: every step's command, on the CPU where it is cheap
#
# Steps, in order, each under its own time limit in seconds (480 together), each logged to <out>/<step>.log:
#   smoke   pytest tests/test_gpu_smoke.py: one training iteration of a FLUX.1-dev-sized transformer     180
#   system  egrpo bench system --gpu --quick: per-call costs of a FLUX.1-dev-sized transformer            100
#   scale   egrpo bench scale --device cuda: SD3.5-medium's width, full fine-tuning, bf16 DeepSpeed ZeRO-3
#           through the Ray runtime, with its checks and torch.cuda.max_memory_allocated per role          90
#   plan    egrpo plan <the config scale ran> --memory --json: the memory plan to hold that against          30
#   bf16    DeepSpeed bf16 learners on the device (LoRA ZeRO 0 and 2, full weights ZeRO 1 and 3): the first
#           ratio is exactly 1, the old log-probs equal the rollout policy's, the weights move             50
#   nccl    one broadcast over a group of egrpo.runtime.weight_sync.join (ProcessGroupNCCL with
#           nccl_options(timeout)), one rank per GPU, up to 2: on one GPU a 1-member group                  30
# Results: <out>/summary.md and <out>/summary.json (every step's status, seconds and key numbers).
# Exit status: 0 when every step passed, 1 otherwise.
#
# Environment: GPU_CHECK_OUT (default runs/gpu-check; emptied first), PYTHON (default python),
# GPU_CHECK_DRY_RUN=1: on the CPU, smoke skips itself, system and scale only have their command lines checked
# by egrpo's own argument parser, plan runs on launch/configs/sd35-egrpo.yaml (shipped architecture), bf16
# runs on the CPU and nccl with gloo (2 ranks).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${GPU_CHECK_OUT:-runs/gpu-check}
python=${PYTHON:-python}
dry_run=${GPU_CHECK_DRY_RUN:-0}
# shellcheck disable=SC1091  # (not followed: it only exports variables)
. launch/env.sh  # offline, no telemetry, caches under /tmp
if [[ $dry_run == 1 ]]; then
  device=cpu
  export DS_ACCELERATOR=cpu
else
  device=cuda
  unset DS_ACCELERATOR  # each learner picks its accelerator from its own device
fi
rm -rf "$out"
mkdir -p "$out"

# step NAME LIMIT COMMAND...: run COMMAND under a time limit (SIGINT first, so Python's cleanup runs, then
# SIGKILL 20 s later) with its output in <out>/NAME.log; record NAME, status, exit code, seconds and limit.
step() {
  local name=$1 limit=$2 rc=0 status=pass start seconds
  shift 2
  echo "== $name (limit ${limit} s): $*"
  start=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" "$@" >"$out/$name.log" 2>&1 || rc=$?
  seconds=$(($(date +%s) - start))
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=fail; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" "$limit" >>"$out/steps.tsv"
  echo "   $status in $seconds s"
}

# The dry run's stand-in for a heavy egrpo command: egrpo's own argument parser must accept its command line.
parses=(-c 'import sys; from egrpo.cli import build_parser; build_parser().parse_args(sys.argv[1:]); print("parses: egrpo", *sys.argv[1:])')
if [[ $dry_run == 1 ]]; then
  egrpo_heavy=("$python" "${parses[@]}")
  plan_config=(launch/configs/sd35-egrpo.yaml --set runtime.learners=1 --set runtime.rollout_workers=1)
  gpu_gb=80
else
  egrpo_heavy=("$python" -m egrpo.cli)
  plan_config=("$out/scale/runs/scale-bfloat16/config.yaml")  # the resolved config scale ran
  gpu_gb=$("$python" -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory / 1e9)')
fi

step smoke 180 "$python" -m pytest -q -s -rs tests/test_gpu_smoke.py
step system 100 "${egrpo_heavy[@]}" bench system --gpu --quick --out "$out/system"
step scale 90 "${egrpo_heavy[@]}" bench scale --device cuda --out "$out/scale"
step plan 30 "$python" -m egrpo.cli plan "${plan_config[@]}" --memory --json --gpu-memory "$gpu_gb"

cat >"$out/bf16_check.py" <<'EOF'
"""DeepSpeed bf16 learners on the device: a tiny FLUX policy in bfloat16, one learner rank per setting, each
trained on minibatches whose old log-probs the rollout policy (loaded the same way) recorded."""
import json
import math
import sys
import time
from pathlib import Path

import torch

from egrpo.batch import Batch
from egrpo.config import TrainConfig
from egrpo.learner import GRPOLearner
from egrpo.models.policy import FlowPolicy
from egrpo.models.families.flux import build_flux_pipeline
from egrpo.models.tiny import save_pipeline
from egrpo.runtime.learner import DeepSpeedLearner, LearnerSettings, free_port

SETTINGS = [("lora", 0), ("lora", 2), ("full", 1), ("full", 3)]  # bf16 full weights need ZeRO >= 1


def policy_pair(folder: Path, device: torch.device, finetune: str) -> list[FlowPolicy]:
    """The rollout worker's policy and the learner's, loaded and set up alike."""
    policies = []
    for _ in range(2):
        policy = FlowPolicy.from_pretrained(folder, device=device, dtype=torch.bfloat16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            policy.setup_finetune(finetune, rank=4, alpha=4, keep_reference=False)
        policies.append(policy)
    return policies


def check(folder: Path, device: torch.device, finetune: str, stage: int) -> dict:
    rollout, policy = policy_pair(folder, device, finetune)
    train = TrainConfig(lr=1e-2, clip_range=10.0, batch_size=4, micro_batch_size=2)
    g = torch.Generator().manual_seed(1)
    steps = Batch({"x_in": torch.randn(8, *policy.latent_shape, generator=g),
                   "x_out": torch.randn(8, *policy.latent_shape, generator=g), "sigma": torch.full((8,), 0.8),
                   "sigma_next": torch.full((8,), 0.7), "g": torch.full((8,), 0.5),
                   "advantage": torch.randn(8, generator=g)}, {"prompt": ["a red circle", "a blue square"] * 4})
    minibatches = steps.chunks(4)
    for mb, logp in zip(minibatches, GRPOLearner(rollout, train).old_logprobs(minibatches), strict=True):
        mb.tensors["logp_old"] = torch.cat(logp).float().cpu()  # what the rollout worker recorded
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    learner = DeepSpeedLearner(policy, train, "mean", LearnerSettings(zero_stage=stage, bf16=True,
                                                                      master_port=free_port()))
    try:
        before = learner.trainable_state_dict()
        metrics = learner.train_iteration(minibatches)
        moved = max((v.float() - before[k].float()).abs().max().item()
                    for k, v in learner.trainable_state_dict().items())
        accelerator = learner._deepspeed.get_accelerator().device_name()
    finally:
        learner.close()
    row = {"finetune": finetune, "zero_stage": stage, "accelerator": accelerator,
           "seconds": time.perf_counter() - start, "rollout_logp_mismatch": metrics["train/rollout_logp_mismatch"],
           "first_ratio_max_dev": metrics["train/first_ratio_max_dev"], "loss": metrics["train/loss"],
           "grad_norm": metrics["train/grad_norm"], "max_weight_change": moved,
           "cuda_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    # the old log-probs are the rollout policy's: exactly on the CPU (tests/test_runtime_learner.py); 1e-4 here,
    # since CUDA kernels may choose other algorithms for other batch shapes
    row["ok"] = (accelerator == device.type and row["first_ratio_max_dev"] == 0 and moved > 0
                 and row["rollout_logp_mismatch"] <= 1e-4
                 and math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]))
    return row


def main(device_name: str, results: str) -> int:
    device, results = torch.device(device_name), Path(results)
    folder = results.parent / "bf16-model"
    save_pipeline(build_flux_pipeline(vae=False, pixel_unshuffle=2), folder, height=32, width=32,
                  pixel_unshuffle=2, max_sequence_length=8)
    ok = True
    for finetune, stage in SETTINGS:
        row = check(folder, device, finetune, stage)
        ok &= row["ok"]
        print(json.dumps(row), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
EOF
step bf16 50 "$python" "$out/bf16_check.py" "$device" "$out/bf16.jsonl"

cat >"$out/nccl_check.py" <<'EOF'
"""One weight-sync broadcast over a group that egrpo.runtime.weight_sync.join makes: NCCL with one rank per GPU
(up to 2; one GPU: a 1-member group), or gloo with 2 ranks on the CPU (the dry run)."""
import json
import sys
import time

import torch
import torch.multiprocessing as mp

from egrpo.runtime.learner import free_port
from egrpo.runtime.weight_sync import GroupAddress, broadcast_bucket, host_store, join, nccl_options

TIMEOUT_S = 20.0


def rank_main(rank: int, address: GroupAddress, results) -> None:
    device = torch.device("cuda", rank) if address.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = host_store(address.host, address.port, TIMEOUT_S) if rank == 0 else None
    group = join(address, rank, store)
    sent = [torch.arange(1 << 20, dtype=torch.float32), torch.linspace(0, 1, 4096)]  # one dtype per bucket
    tensors = [t.to(device) if rank == 0 else torch.zeros_like(t, device=device) for t in sent]
    start = time.perf_counter()
    broadcast_bucket(group, tensors, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    results.put({"rank": rank, "seconds": time.perf_counter() - start,
                 "received": all(torch.equal(t.cpu(), s) for t, s in zip(tensors, sent, strict=True))})


def main(device: str, result_file: str) -> int:
    backend = "nccl" if device == "cuda" else "gloo"
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    world = min(gpus, 2) if backend == "nccl" else 2
    result = {"backend": backend, "gpus": gpus, "world_size": world}
    if backend == "nccl":
        result["nccl_options_timeout_s"] = nccl_options(TIMEOUT_S)._timeout.total_seconds()
    address = GroupAddress("127.0.0.1", free_port(), world, 0, backend, TIMEOUT_S)
    context = mp.get_context("spawn")  # each rank imports this file again: hence the __main__ guard
    results = context.Queue()
    processes = [context.Process(target=rank_main, args=(r, address, results)) for r in range(world)]
    for p in processes:
        p.start()
    ranks = sorted((results.get(timeout=TIMEOUT_S + 10) for _ in processes), key=lambda r: r["rank"])
    for p in processes:
        p.join(timeout=10)
    result["ranks"] = ranks
    result["ok"] = len(ranks) == world and all(r["received"] for r in ranks)
    if backend == "nccl" and world < 2:
        result["multi_rank"] = f"not run: NCCL needs one GPU per rank and this machine has {gpus}; awaits 2+ GPUs"
    print(json.dumps(result))
    with open(result_file, "w") as f:
        json.dump(result, f)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
EOF
step nccl 30 "$python" "$out/nccl_check.py" "$device" "$out/nccl.json"

cat >"$out/summarize.py" <<'EOF'
"""summary.json and summary.md from the steps' records (steps.tsv) and their outputs."""
import json
import re
import sys
from pathlib import Path

out, dry_run = Path(sys.argv[1]), sys.argv[2] == "1"


def read_json(name: str):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


def read_jsonl(name: str) -> list:
    path = out / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def smoke() -> dict:
    log = (out / "smoke.log").read_text()
    peak = re.search(r"peak GPU memory: ([\d.]+) GiB", log)
    return {"pytest": {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", log)},
            "peak_gpu_gib": float(peak.group(1)) if peak else None}


def system() -> dict:
    summary = read_json("system/summary.json")
    if summary is None:
        return {"not run": "dry run: the command line parses"} if dry_run else {}
    gpu = summary.get("gpu") or {}
    if "rollout" not in gpu:
        return {"gpu": gpu.get("skipped", "no gpu section")}
    return {"device": gpu["device"], "rollout_s_per_nfe": gpu["rollout"]["seconds_per_nfe"],
            "rollout_images_per_s": gpu["rollout"]["images_per_s"],
            "rollout_peak_gib": gpu["rollout"]["peak_memory_gib"], "probe_ratio": gpu["probe"]["ratio"],
            "learn_s_per_step": gpu["learn"]["seconds_per_step"], "learn_peak_gib": gpu["learn"]["peak_memory_gib"]}


def scale() -> dict:
    summary = read_json("scale/summary.json")
    if summary is None:
        return {"not run": "dry run: the command line parses"} if dry_run else {}
    run = summary["runs"][0]
    return {"checks_ok": summary["ok"], "failed_checks": [n for n, c in run["checks"].items() if not c["ok"]],
            "rollout_logp_mismatch": run["checks"].get("rollout_logp_mismatch", {}).get("value"),
            "measured_vs_plan": {role: {"measured_mib": m["measured_mib"], "plan_mib": m["planned_mib"],
                                        "ratio": m["ratio"], "measured_as": m["measured_as"]}
                                 for role, m in run["memory"].items()}}


def plan() -> dict:
    log = (out / "plan.log").read_text().strip()
    roles = json.loads(log.splitlines()[-1])["roles"]
    return {"peak_gb_with_cuda_context": {role: r["peak_gb"] for role, r in roles.items()}}


NUMBERS = {"smoke": smoke, "system": system, "scale": scale, "plan": plan,
           "bf16": lambda: {"runs": read_jsonl("bf16.jsonl")}, "nccl": lambda: read_json("nccl.json") or {}}
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, rc, seconds, limit = line.split("\t")
    try:
        numbers = NUMBERS[name]()
    except (OSError, LookupError, TypeError, ValueError) as e:
        numbers = {"unreadable": f"{type(e).__name__}: {e}"}
    if name == "smoke" and status == "pass" and "skipped" in numbers.get("pytest", {}):
        status = "skipped"  # no CUDA
    steps.append({"step": name, "status": status, "exit_code": int(rc), "seconds": int(seconds),
                  "limit_s": int(limit), "log": str(out / f"{name}.log"), "numbers": numbers})
ok = all(s["status"] == "pass" or (dry_run and s["status"] == "skipped") for s in steps)
summary = {"dry_run": dry_run, "ok": ok, "seconds": sum(s["seconds"] for s in steps), "steps": steps}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
lines = [f"# GPU check{' (dry run, CPU)' if dry_run else ''}: {'all passed' if ok else 'FAILED'}, "
         f"{summary['seconds']} s", "", "| step | status | seconds (limit) | key numbers |", "|---|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} ({s['limit_s']}) | `{json.dumps(s['numbers'])}` |"
          for s in steps]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if ok else 1)
EOF
"$python" "$out/summarize.py" "$out" "$dry_run"
