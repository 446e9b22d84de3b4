"""`egrpo bench scale`: a rehearsal of full fine-tuning at a real model's width, through `egrpo train`'s code.

What it proves, on the CPU of a laptop or CI machine (or on GPUs, `--device cuda`), before a cluster is rented:
a transformer as wide as SD3.5-medium's (SD3Transformer2DModel, 24 heads x 64 = 1536, T5 width 4096, pooled
width 2048, RMS-normed q/k, dual attention in block 0; a few blocks; random weights) sits in a real
StableDiffusion3Pipeline folder with tiny text encoders and a tiny 8x VAE (egrpo.models.tiny), and the
Ray runtime (`RayTrainer`, the class behind `egrpo train`) loads it through `model.path` and trains it:

- full fine-tuning on 2 DeepSpeed ZeRO-3 learners whose minibatches do not divide over the ranks (odd
  `train.batch_size`, micro-batches), so one rank pads with a zero-weight row every step;
- 2 rollout workers that get the new weights by broadcast from learner rank 0, bucket by bucket, with
  `runtime.sync_check` comparing checksums after every sync;
- two iterations, with the held-out evaluations and the checkpoint `egrpo train` does, on a local Ray whose
  every actor call times out after `runtime.timeout_s`.

Checks (each is a row of the printed table and of `summary.json`; the command exits 1 when one fails): the
run finished (nothing hung), every sample came back, every sync arrived intact (`sync/max_checksum_error ==
0`), the learners' old log-probs equal the rollouts' to a measured tolerance (`train/rollout_logp_mismatch`)
and the first ratio is exactly 1 (`train/first_ratio_max_dev == 0`), the loss and gradient norm are finite,
some minibatch split unevenly over the ranks, and each role's measured peak memory is within the memory plan
(egrpo.memory.memory_plan of the same config, without its CUDA context).

Memory is taken in every actor after each phase of the run (start, evaluations, iterations, checkpoint), each
phase's own peak. On CUDA it is torch.cuda.max_memory_allocated. On the CPU it is the peak resident memory
(VmHWM) above the import footprint (an actor that imports what the role imports and loads nothing), made to
follow live tensors as the CUDA statistics do: the actors run with glibc returning freed blocks to the system
(`start_local_ray`), and the model folder is float16, so every load copies the weights (`write_model`).

Sizes (`QUICK`, `FULL`): a few blocks, small images. On the CPU the runs are float32 unless the CPU has bf16
instructions (`default_dtypes`); `--dtype bfloat16` forces the bf16 path (DeepSpeed bf16, fp32 masters and
gradient accumulation), slowly.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from egrpo.bench.common import describe_machine, machine, peak_rss_mb, table, write_summary
from egrpo.config import Config, from_dict
from egrpo.models.families.sd3 import build_wide_sd3_pipeline
from egrpo.models.tiny import save_pipeline
from egrpo.runtime.driver import ClusterError, RayTrainer

MiB = 2**20
VAE_DOWNSAMPLING = 8  # the tiny VAE's, as SD3's
LEARNERS = 2
ROLLOUT_WORKERS = 2
# The largest |learner old log-prob - rollout log-prob| accepted, by compute dtype. The two compute the same
# transition in different batches (rollouts: every sample at a schedule index together; learners: their
# micro-batches), so kernels round differently. Measured on the CPU (BENCHMARKS.md): float32 1.2e-7.
LOGP_TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2}
PROMPTS = "toy:train"  # toy prompts: the toy rewards score any image against them
REWARDS = {"toy_colour": 1.0, "toy_position": 1.0}
CPU_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # start_local_ray


@dataclass(frozen=True)
class Rehearsal:
    """One rehearsal's size: the model, its images, and what one iteration trains."""

    blocks: int  # joint transformer blocks at SD3.5-medium's width (it has 24)
    image_size: int  # square images in pixels; the transformer sees (size / 8 / 2)^2 image tokens
    max_sequence_length: int  # T5 tokens per prompt (SD3 adds CLIP's 77)
    steps: int  # sampler steps; E-GRPO branches at the first steps / 2
    prompts: int  # prompts per iteration: at least one per rollout worker
    group_size: int  # E-GRPO branches per (prompt, active step), each with one trained step
    batch_size: int  # trained steps per minibatch: odd, so LEARNERS ranks split it unevenly
    micro_batch_size: int  # rows per learner forward
    iterations: int


# QUICK: 3 prompts x 3 branches = 9 trained steps, one minibatch: 5 rows on rank 0, 4 and a zero-weight pad on
# rank 1, each in 2 micro-batches. FULL: 2 prompts x 2 active steps x 3 branches = 12 trained steps in groups of
# 3 that share an input (kept together), so minibatches of 9 and 3: 5 + 4 (and a pad), 2 + 1 (and a pad) rows
# per rank, micro-batches of 2.
QUICK = Rehearsal(blocks=1, image_size=64, max_sequence_length=16, steps=2, prompts=3, group_size=3, batch_size=9,
                  micro_batch_size=3, iterations=2)
FULL = Rehearsal(blocks=2, image_size=256, max_sequence_length=64, steps=4, prompts=2, group_size=3, batch_size=9,
                 micro_batch_size=2, iterations=2)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 arithmetic


def default_dtypes(device: str) -> tuple[str, ...]:
    """The runs a device gets by default: bfloat16 on CUDA; on the CPU float32, and bfloat16 too where the CPU
    has bf16 instructions. Without them torch emulates bf16 (on AVX2, a 1536-wide block's backward pass ran 20
    to 30 times slower than in float32), which would make a rehearsal of minutes one of hours."""
    if device == "cuda":
        return ("bfloat16",)
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return ("float32", "bfloat16") if flags & set(NATIVE_BF16_FLAGS) else ("float32",)


def write_model(folder: Path, rehearsal: Rehearsal) -> int:
    """Save the rehearsal's StableDiffusion3Pipeline to `folder` (replacing what is there); returns the
    transformer's parameter count. The weights are saved in float16, so that every run's load converts
    (copies) them, as a load onto a GPU does: loaded in the file's own dtype on the CPU they would stay views of
    the memory-mapped file, and under ZeRO-3 one unpartitioned buffer (the positional embedding) keeps the
    whole mapping resident once the partitioning has read it, a model's worth of page cache per learner that
    no GPU run holds and no plan counts."""
    shutil.rmtree(folder, ignore_errors=True)
    pipe = build_wide_sd3_pipeline(num_layers=rehearsal.blocks, latent_size=rehearsal.image_size // VAE_DOWNSAMPLING)
    save_pipeline(pipe.to(torch.float16), folder, height=rehearsal.image_size, width=rehearsal.image_size,
                  max_sequence_length=rehearsal.max_sequence_length)
    return sum(p.numel() for p in pipe.transformer.parameters())


def rehearsal_config(rehearsal: Rehearsal, model: Path, out: Path, dtype: str, device: str) -> Config:
    """The run's config, as `egrpo train CONFIG --set ...` would build it. On CUDA each actor gets a GPU of its
    own where there are enough (NCCL needs one device per rank); on one GPU the learner and the rollout worker
    share it, so there is one of each and the weights go through the object store instead of a NCCL broadcast."""
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    layout = _cuda_layout(gpus) if device == "cuda" else {
        "rollout_workers": ROLLOUT_WORKERS, "learners": LEARNERS, "weight_sync": "broadcast",
        "rollout_gpus": 0.0, "reward_gpus": 0.0, "learner_gpus": 0.0}
    return from_dict({
        "run": {"name": f"scale-{dtype}", "dir": str(out / "runs"), "device": device, "wandb": "disabled"},
        "model": {"path": str(model), "dtype": dtype, "finetune": "full"},
        "sampler": {"steps": rehearsal.steps, "batch_size": 4, "decode_batch_size": 2, "vae_tiling": True},
        "plan": {"method": "egrpo", "group_size": rehearsal.group_size,
                 "prompts_per_iteration": rehearsal.prompts},
        "train": {"iterations": rehearsal.iterations, "batch_size": rehearsal.batch_size,
                  "micro_batch_size": rehearsal.micro_batch_size, "lr": 1e-5, "eval_every": 0,
                  "eval_prompts": 1, "eval_seeds": 1, "checkpoint_every": rehearsal.iterations},
        "rewards": {"weights": REWARDS},
        "data": {"prompts": PROMPTS},
        "runtime": {"backend": "ray", "reward_servers": 1, "zero_stage": 3, "bf16": dtype == "bfloat16",
                    "sync_check": True, "timeout_s": 300.0, "dashboard": False, "rollout_cpus": 1.0,
                    "learner_cpus": 1.0, "reward_cpus": 0.5, **layout},
    })


def _cuda_layout(gpus: int) -> dict[str, Any]:
    if gpus >= ROLLOUT_WORKERS + LEARNERS:
        return {"rollout_workers": ROLLOUT_WORKERS, "learners": LEARNERS, "weight_sync": "broadcast",
                "rollout_gpus": 1.0, "reward_gpus": 0.0, "learner_gpus": 1.0}
    if gpus < 1:
        raise SystemExit("egrpo bench scale --device cuda: CUDA is not available on this machine")
    return {"rollout_workers": 1, "learners": 1, "weight_sync": "object_store", "rollout_gpus": 0.5,
            "reward_gpus": 0.0, "learner_gpus": 0.5}


# ------------------------------------------------------------------------------------------------ memory

ROLES = ("rollout", "reward", "learner")
MEMORY_PHASES = ("startup", "evaluate", "iteration", "checkpoint")  # MeasuredTrainer's snapshots


def _status_mib(field: str) -> float:
    """A field of /proc/self/status (VmHWM: peak resident memory, VmRSS: resident now) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def memory_since_last_snapshot(_actor: Any = None) -> dict[str, float | None]:
    """This process's memory in MiB since the previous call (or its start), then restarts the peaks: the peak
    resident memory (VmHWM; Linux resets it on `5` into /proc/self/clear_refs), the resident memory now and,
    where this process uses CUDA, the peak of torch's allocator. Run inside an actor by `__ray_call__`
    (which passes the actor)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    snapshot = {"peak_rss_mib": _status_mib("VmHWM"), "rss_mib": _status_mib("VmRSS"),
                "cuda_peak_mib": torch.cuda.max_memory_allocated() / MiB if cuda else None}
    Path("/proc/self/clear_refs").write_text("5")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return snapshot


@ray.remote(num_cpus=0)
class ImportFootprint:
    """A process that imports what the actors import and loads nothing: the part of an actor's resident memory
    that is not its models' or its data's. Rollout workers and reward servers import egrpo's runtime and
    loaders (diffusers, transformers, peft); learners also DeepSpeed."""

    def footprints(self) -> dict[str, float]:
        from diffusers import StableDiffusion3Pipeline  # noqa: F401

        import egrpo.models.policy  # noqa: F401
        import egrpo.runtime.actors  # noqa: F401
        import egrpo.trainer  # noqa: F401
        from egrpo.runtime.learner import _import_deepspeed

        rollout = _status_mib("VmHWM")
        _import_deepspeed(torch.device("cpu"))
        return {"rollout": rollout, "reward": rollout, "learner": _status_mib("VmHWM")}


def import_footprints() -> dict[str, float]:
    """Peak resident MiB per role of a process that only imported what that role imports."""
    actor = ImportFootprint.remote()
    try:
        return ray.get(actor.footprints.remote(), timeout=300)
    finally:
        ray.kill(actor)


class MeasuredTrainer(RayTrainer):
    """RayTrainer that times its start, iterations, evaluations and checkpoint, and takes every actor's memory
    after each of them (`memory_since_last_snapshot`: each phase's own peak). Nothing of the training changes."""

    def __init__(self, cfg: Config) -> None:
        start = time.perf_counter()
        self.seconds: dict[str, list[float]] = {"iteration": [], "evaluate": [], "checkpoint": []}
        self.memory: dict[str, dict[str, list[dict[str, float | None]]]] = {role: {} for role in ROLES}
        super().__init__(cfg)
        self.seconds["startup"] = [time.perf_counter() - start]
        self._snapshot("startup")

    def _snapshot(self, phase: str) -> None:
        """Each role's actors' memory in `phase`; repeated phases keep the largest."""
        groups = {"rollout": self.rollout.actors, "reward": self.reward.actors, "learner": self.learners.actors}
        for role, actors in groups.items():
            taken = self._get([a.__ray_call__.remote(memory_since_last_snapshot) for a in actors], "memory")
            seen = self.memory[role].setdefault(phase, taken)
            for k, (old, new) in enumerate(zip(seen, taken, strict=True)):
                seen[k] = {key: max(old[key], new[key]) if new[key] is not None else None for key in new}

    def _timed(self, phase: str, call, *args):
        start = time.perf_counter()
        result = call(*args)
        self.seconds[phase].append(time.perf_counter() - start)
        self._snapshot(phase)
        return result

    def iteration(self, iteration: int) -> dict[str, Any]:
        return self._timed("iteration", super().iteration, iteration)

    def evaluate(self):
        return self._timed("evaluate", super().evaluate)

    def save(self, iteration: int) -> Path:
        return self._timed("checkpoint", super().save, iteration)


def planned_memory(cfg: Config) -> dict[str, float]:
    """The memory plan's peak per role in MiB (egrpo.memory.memory_plan), without its CUDA context: neither
    a CPU process nor torch's CUDA allocator statistics hold one. Roles the plan gives nothing else (the toy
    rewards have no model) are left out."""
    from egrpo.memory import memory_plan

    planned = {}
    for role in memory_plan(cfg).roles:
        peak = max(sum(v for part, v in phase.items() if part != "CUDA context") for phase in role.phases.values())
        if peak > 0:
            planned[role.role] = peak / MiB
    return planned


# ------------------------------------------------------------------------------------------------ checks


def _check(value: Any, limit: Any, ok: bool, what: str) -> dict[str, Any]:
    return {"value": value, "limit": limit, "ok": bool(ok), "what": what}


def run_checks(cfg: Config, records: list[dict[str, Any]], memory: dict[str, Any],
               error: str | None) -> dict[str, dict[str, Any]]:
    """The rehearsal's checks (module docstring), from the run's metrics.jsonl records (non-finite numbers as
    None: `_json_record`) and memory."""
    trained = [r for r in records if r.get("train/steps")]
    checks = {"finished": _check(error or "yes", "no error, every call within runtime.timeout_s",
                                 error is None and len(trained) == cfg.train.iterations,
                                 "the run ended normally: nothing hung or failed")}
    if not trained:
        return checks
    dtype = cfg.model.dtype
    mismatch = max(r["train/rollout_logp_mismatch"] for r in trained)
    checks.update({
        "samples_accounted": _check(sum(r["samples/received"] for r in trained),
                                    sum(r["samples/requested"] for r in trained),
                                    all(r["samples/received"] == r["samples/requested"] for r in trained),
                                    "every planned sample came back"),
        "sync_checksum": _check(max(r["sync/max_checksum_error"] for r in trained), 0.0,
                                all(r["sync/max_checksum_error"] == 0 for r in trained),
                                "every rollout worker holds exactly learner rank 0's weights after each sync"),
        "rollout_logp_mismatch": _check(mismatch, LOGP_TOLERANCE[dtype], mismatch <= LOGP_TOLERANCE[dtype],
                                        "max |learner old log-prob - rollout log-prob|"),
        "first_ratio": _check(max(r["train/first_ratio_max_dev"] for r in trained), 0.0,
                              all(r["train/first_ratio_max_dev"] == 0 for r in trained),
                              "max |ratio - 1| before the first step: old log-probs replayed exactly"),
        "finite_update": _check([r["train/grad_norm"] for r in trained], "finite",
                                all(r["train/loss"] is not None and r["train/grad_norm"] is not None
                                    for r in trained), "gradient norms; losses and norms are finite (not null)"),
    })
    if cfg.runtime.learners > 1:
        padding = [r["train/padding_rows"] for r in trained]
        checks["uneven_minibatches"] = _check(padding, "> 0 in some iteration", any(p > 0 for p in padding),
                                              "zero-weight rows the learner ranks padded their uneven slices with")
    for role, entry in memory.items():
        if entry["planned_mib"] is None:
            continue  # nothing in the plan besides a CUDA context (the toy rewards)
        checks[f"memory_{role}"] = _check(entry["measured_mib"], entry["planned_mib"],
                                          entry["measured_mib"] <= entry["planned_mib"],
                                          f"{role}: {entry['measured_as']} within the plan")
    return checks


# ------------------------------------------------------------------------------------------------ the run


def measure(cfg: Config) -> dict[str, Any]:
    """Run `cfg` through MeasuredTrainer.run (as `egrpo train` does): its times, memory against the plan, metrics
    and checks. A run that stops with a ClusterError (an actor call past runtime.timeout_s) fails `finished`."""
    plan = planned_memory(cfg)
    footprints = import_footprints() if cfg.run.device == "cpu" else {}
    error, trainer = None, None
    start = time.perf_counter()
    try:
        trainer = MeasuredTrainer(cfg)
        trainer.run()  # closes the trainer, also when it raises
    except ClusterError as e:
        error = str(e)
    wall = time.perf_counter() - start
    records = [_json_record(r) for r in trainer.log.records()] if trainer is not None else []
    measured = trainer.memory if trainer is not None else {}
    memory = {role: role_memory(cfg, measured[role], plan.get(role), footprints.get(role, 0.0))
              for role in ROLES if measured.get(role)}
    trained = [r for r in records if r.get("train/steps")]
    phases = {name: [r.get(f"time/{name}", 0.0) for r in trained]
              for name in ("schedule", "rollout", "reward", "learn", "sync")}
    return {"dtype": cfg.model.dtype, "wall_s": wall, "seconds": trainer.seconds if trainer else {},
            "phases": phases, "memory": memory, "import_footprint_mib": footprints, "actor_memory": measured,
            "metrics": records, "checks": run_checks(cfg, records, memory, error)}


def role_memory(cfg: Config, phases: dict[str, list[dict[str, Any]]], planned_mib: float | None,
                footprint_mib: float) -> dict[str, Any]:
    """A role's memory in each phase (the largest over its actors) and its peak, against the plan's peak: on
    CUDA the allocator's peak, on the CPU the peak resident memory above the role's import footprint."""
    if cfg.run.device == "cuda":
        per_phase = {phase: max(a["cuda_peak_mib"] or 0.0 for a in actors) for phase, actors in phases.items()}
        measured_as = "CUDA peak allocated"
    else:
        per_phase = {phase: max(a["peak_rss_mib"] for a in actors) - footprint_mib
                     for phase, actors in phases.items()}
        measured_as = "peak RSS - import footprint"
    peak_phase = max(per_phase, key=per_phase.get)
    return {"measured_mib": per_phase[peak_phase], "peak_phase": peak_phase, "phases_mib": per_phase,
            "planned_mib": planned_mib, "ratio": per_phase[peak_phase] / planned_mib if planned_mib else None,
            "measured_as": measured_as}


def _json_record(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl record for summary.json, which holds no NaN: a non-finite number becomes null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def start_local_ray(cfg: Config) -> None:
    """A local Ray as `egrpo train` starts one (egrpo.runtime.driver.connect), with, on the CPU, glibc told to
    return every freed block of 128 KiB or more to the system at once (MALLOC_MMAP_THRESHOLD_): then an actor's
    resident memory follows its live tensors, as the CUDA allocator's statistics do, instead of keeping the
    high-water mark of its heap."""
    from egrpo.runtime.driver import ACTOR_ENV, role_resources

    needed = sum(n * cpus for n, cpus, _ in role_resources(cfg, use_gpus=False).values())
    env = {**ACTOR_ENV, **(CPU_ALLOCATOR_ENV if cfg.run.device == "cpu" else {})}
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), include_dashboard=False,
             runtime_env={"env_vars": env}, log_to_driver=True)


# ------------------------------------------------------------------------------------------------ report


def report(summary: dict[str, Any]) -> str:
    lines = [f"machine: {describe_machine(summary['machine'])}",
             f"model: SD3Transformer2DModel at SD3.5-medium's width, {summary['rehearsal']['blocks']} blocks, "
             f"{summary['parameters'] / 1e6:.1f}M parameters, {summary['rehearsal']['image_size']} px"]
    for run in summary["runs"]:
        s = run["seconds"]
        lines += ["", f"{run['dtype']}: {run['wall_s']:.0f} s",
                  table(["phase", "seconds"],
                        [["startup (Ray actors, model loads, learner group)", sum(s.get("startup", []))],
                         *[[f"iteration {k + 1}", v] for k, v in enumerate(s.get("iteration", []))],
                         *[[f"  {name} (mean)", sum(v) / len(v)] for name, v in run["phases"].items() if v],
                         ["evaluations (start and end)", sum(s.get("evaluate", []))],
                         ["checkpoint", sum(s.get("checkpoint", []))]]),
                  f"memory per role, MiB ({next(iter(run['memory'].values()))['measured_as']}; the largest "
                  "actor of each role, in each phase):",
                  table(["role", *MEMORY_PHASES, "peak", "plan", "peak / plan"],
                        [[role, *(m["phases_mib"].get(p) for p in MEMORY_PHASES), m["measured_mib"],
                          m["planned_mib"], m["ratio"]] for role, m in run["memory"].items()]),
                  table(["check", "value", "limit", "ok"],
                        [[name, c["value"], c["limit"], "yes" if c["ok"] else "NO"]
                         for name, c in run["checks"].items()])]
    return "\n".join(lines)


def main(quick: bool = False, out: Path = Path("runs/bench/scale"), device: str = "cpu",
         dtype: str | None = None) -> int:
    """Run the rehearsal (module docstring) once per dtype; write summary.json under `out` and print the
    tables. Returns 0 when every check passed, else 1. Starts a local Ray unless this process is connected
    to one (then that Ray is left running)."""
    rehearsal = QUICK if quick else FULL
    if dtype:
        dtypes: tuple[str, ...] = (dtype,)
    else:  # --quick is one run: float32 on the CPU (as its help says), whatever bf16 the CPU has
        dtypes = default_dtypes(device)[:1] if quick else default_dtypes(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    parameters = write_model(out / "model", rehearsal)
    command = ["egrpo bench scale", *(["--quick"] if quick else []), *(["--device", device] if device != "cpu" else []),
               *(["--dtype", dtype] if dtype else []), "--out", str(out)]
    summary: dict[str, Any] = {"command": " ".join(command), "machine": machine(), "rehearsal": asdict(rehearsal),
                               "device": device, "parameters": parameters, "runs": []}
    owns_ray = not ray.is_initialized()
    try:
        for run_dtype in dtypes:
            cfg = rehearsal_config(rehearsal, out / "model", out, run_dtype, device)
            if owns_ray and not ray.is_initialized():
                start_local_ray(cfg)
            summary["runs"].append(measure(cfg))
    finally:
        if owns_ray:
            ray.shutdown()
    summary["driver_peak_rss_mib"] = peak_rss_mb()
    summary["wall_seconds"] = time.perf_counter() - start
    summary["ok"] = all(c["ok"] for run in summary["runs"] for c in run["checks"].values())
    path = write_summary(out, summary)
    print(report(summary))
    print(f"\nall checks passed: {'yes' if summary['ok'] else 'NO'}; wrote {path}")
    return 0 if summary["ok"] else 1
