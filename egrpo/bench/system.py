"""`egrpo bench system`: what the runtime costs, measured side by side in one run.

- Throughput: the Ray runtime against the in-process loop on the same config (the AEGPO toy recipe, which
  has every phase; one rollout worker, one reward server, one learner, models on the CPU), without and with
  one-step-off overlap. images/s counts the iteration's samples over the whole iteration's wall time; the
  ratio to the in-process loop is the runtime's overhead. Each Ray variant alternates blocks of the same
  iterations with a fresh in-process loop, so both see the same load from the machine's other users, and the
  ratio is taken within those pairs; the first iteration of every block is not timed.
- Phase breakdown per iteration: the loops' own `time/*` metrics (probe, schedule, rollout, reward, learn,
  sync) and the rest of the iteration (`other`: driver work between phases). The in-process loop times no
  schedule or sync phase: its planning is inside `rollout` and its weights need no sync. Under overlap,
  `learn` also holds planning and probing the next iteration, whose rollouts run meanwhile.
- Peak memory (VmHWM) per actor role, read inside each actor, and of the driver.
- Attention-probe overhead: the anchor pass with probes against the same pass without them.
- Weight sync: a state dict from the driver to two receiver actors, by torch.distributed broadcast (gloo,
  egrpo.runtime.weight_sync) and through the Ray object store (put, then get in each receiver), for the toy
  model's LoRA and full weights and larger synthetic states; GB/s is the payload each receiver gets.
- Scheduler cost: drawing prompts and building the plan (aegpo with synthetic probe results), and splitting it
  over rollout workers, against the number of prompts and workers; plain objects, no Ray.
- `--gpu`: the same measurements, where they apply to one GPU, on a FLUX.1-dev-sized random transformer
  (egrpo.bench.gpu).
"""

from __future__ import annotations

import itertools
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch

from egrpo.bench.common import (
    describe_machine,
    figure,
    machine,
    median_seconds,
    peak_rss_mb,
    recipe,
    save_figure,
    table,
    write_summary,
)
from egrpo.bench.gpu import FLUX_DEV, flux_measurements
from egrpo.bench.gpu import report as gpu_report
from egrpo.bench.sync import MiB, measure_sync, sync_states
from egrpo.config import Config, load_config
from egrpo.data.prompts import load_prompts
from egrpo.entropy.attention import AttentionEntropyProbe
from egrpo.runtime.driver import RayTrainer, connect
from egrpo.sampling.plans import prompt_seed
from egrpo.sampling.rollout import ProbeResult, anchor_latents
from egrpo.scheduler import Scheduler, split_by_prompt
from egrpo.trainer import Trainer, load_policy, probe_settings, sampler_settings

log = logging.getLogger("egrpo.bench")

PHASES = ("probe", "schedule", "rollout", "reward", "learn", "sync")
PREFETCHED = ("probe", "schedule")  # under overlap: done for the next iteration inside this one's learn phase
METHOD = "aegpo"  # the recipe of the runtime comparison: the only method with every phase


@dataclass(frozen=True)
class Settings:
    rounds: int  # blocks of iterations per backend, alternating in-process and Ray
    block: int  # timed iterations per block, after one untimed iteration
    two_workers: bool  # also run Ray with two rollout workers
    probe_prompts: int  # anchors in the probe-overhead pass
    repeats: int  # timed repeats of the small measurements (medians)
    sync_mib: tuple[int, ...]  # synthetic state sizes for weight sync, besides the toy model's
    sync_receivers: int
    scheduler_prompts: tuple[int, ...]
    scheduler_workers: tuple[int, ...]


FULL = Settings(rounds=4, block=5, two_workers=True, probe_prompts=8, repeats=5, sync_mib=(4, 16, 64, 256),
                sync_receivers=2, scheduler_prompts=(2, 8, 32, 128, 512), scheduler_workers=(1, 4, 16, 64))
QUICK = Settings(rounds=1, block=2, two_workers=False, probe_prompts=2, repeats=3, sync_mib=(16,),
                 sync_receivers=2, scheduler_prompts=(2, 32), scheduler_workers=(1, 4))


def runtime_config(out: Path, name: str, settings: Settings, *overrides: str) -> Config:
    """The comparison's config: the toy recipe on the CPU everywhere (also on a GPU machine), so that every
    variant computes the same thing. One iteration more than measured, so that under overlap every measured
    iteration prefetches the next."""
    return load_config(recipe(METHOD), [
        f"run.dir={out / 'runs'}", f"run.name={name}", "run.wandb=disabled", "run.device=cpu",
        f"train.iterations={settings.rounds * (settings.block + 1) + 1}", "runtime.dashboard=false",
        "runtime.rollout_workers=1", "runtime.reward_servers=1", "runtime.learners=1", "runtime.rollout_gpus=0",
        "runtime.reward_gpus=0", "runtime.learner_gpus=0", *overrides])


Timed = list[tuple[float, dict[str, Any]]]  # (wall seconds, the iteration's metrics)


def alternate(local: Trainer, remote: RayTrainer, settings: Settings) -> tuple[Timed, Timed]:
    """Alternate blocks of the same iterations between the in-process loop and a Ray variant, so that both
    see the same load from the machine's other users. The first iteration of each block is not timed: it
    absorbs the switch (under overlap, the other's trailing rollouts)."""
    timed: tuple[Timed, Timed] = ([], [])
    for r in range(settings.rounds):
        first = r * (settings.block + 1)
        for trainer, out in zip((local, remote), timed, strict=True):
            for iteration in range(first, first + settings.block + 1):
                start = time.perf_counter()
                metrics = trainer.iteration(iteration)
                if iteration > first:
                    out.append((time.perf_counter() - start, metrics))
    return timed


def iteration_stats(timed: Timed, overlap: bool = False) -> dict[str, Any]:
    """Mean iteration time and phases, images/s over the whole iterations. `other` is the iteration's time
    outside the phases; under overlap, probe and schedule run inside the previous iteration's learn phase,
    so they are not subtracted again."""
    seconds = [s for s, _ in timed]
    records = [m for _, m in timed]
    phases = {phase: statistics.fmean(r.get(f"time/{phase}", 0.0) for r in records) for phase in PHASES}
    iteration = statistics.fmean(seconds)
    phases["other"] = iteration - sum(v for k, v in phases.items() if not (overlap and k in PREFETCHED))
    probe = sum(r["time/probe"] for r in records)
    return {"iterations": len(timed), "iteration_s": iteration,
            "images_per_s": sum(r["samples"] for r in records) / sum(seconds),
            "samples_per_iteration": statistics.fmean(r["samples"] for r in records), "phases": phases,
            "probe_time_share": probe / (probe + sum(r["time/rollout"] for r in records)),
            "staleness_max": max(r.get("staleness/max", 0) for r in records)}


def _actor_peak_rss_mb(_actor: Any) -> float:
    """Run inside an actor (`__ray_call__`): that process's peak resident memory."""
    return peak_rss_mb()


def actor_memory(trainer: RayTrainer) -> dict[str, float]:
    """Peak resident memory (MiB) per role: the largest over the role's actors."""
    groups = {"scheduler": [trainer.scheduler], "rollout": trainer.rollout.actors, "reward": trainer.reward.actors,
              "learner": trainer.learners.actors}
    return {role: max(ray.get([a.__ray_call__.remote(_actor_peak_rss_mb) for a in actors], timeout=60))
            for role, actors in groups.items()}


def runtime_comparison(settings: Settings, out: Path) -> dict[str, Any]:
    """Each Ray variant against a fresh in-process loop doing the same iterations, in alternating blocks
    (one Ray variant at a time: the runtime names its actors, so two cannot share a Ray)."""
    variants = {"ray": runtime_config(out, "ray", settings),
                "ray + overlap": runtime_config(out, "ray-overlap", settings, "runtime.overlap=true")}
    if settings.two_workers:
        variants["ray, 2 rollout workers"] = runtime_config(out, "ray-2-workers", settings,
                                                            "runtime.rollout_workers=2")
    connect(max(variants.values(), key=lambda cfg: cfg.runtime.rollout_workers))
    results: dict[str, Any] = {}
    local_timed: Timed = []
    memory: dict[str, float] = {}
    for name, cfg in variants.items():
        log.info("system bench: in-process loop against %s", name)
        local = Trainer(replace(cfg, runtime=replace(cfg.runtime, backend="local"),
                                run=replace(cfg.run, name=f"{cfg.run.name}-in-process")))
        start = time.perf_counter()
        remote = RayTrainer(cfg)
        startup = time.perf_counter() - start
        try:
            paired = alternate(local, remote, settings)
            if name == "ray":
                memory = {"driver": peak_rss_mb(), **actor_memory(remote)}
        finally:
            local.close()
            remote.close()
        local_timed += paired[0]
        here = iteration_stats(paired[0])
        results[name] = {"startup_s": startup, "overlap": cfg.runtime.overlap,
                         **iteration_stats(paired[1], cfg.runtime.overlap),
                         "in_process_images_per_s": here["images_per_s"]}
        results[name]["throughput_ratio"] = results[name]["images_per_s"] / here["images_per_s"]
    results = {"in-process": {"overlap": False, **iteration_stats(local_timed), "throughput_ratio": 1.0}, **results}
    return {"config": f"launch/configs/toy-{METHOD}.yaml", "variants": results, "peak_memory_mib": memory}


# ------------------------------------------------------------------------------------------ probe overhead


def probe_overhead(settings: Settings) -> list[dict[str, Any]]:
    """Seconds of the deterministic anchor pass over the AEGPO recipe's steps, with and without the attention
    probe (all attention blocks, and the first one only)."""
    cfg = load_config(recipe(METHOD), ["run.device=cpu"])
    policy, sampler = load_policy(cfg), sampler_settings(cfg)
    keys = [(p, prompt_seed(cfg.run.seed, p)) for p in load_prompts(cfg.data.prompts)[: settings.probe_prompts]]
    until = [cfg.sampler.steps] * len(keys)
    plain = median_seconds(lambda: anchor_latents(policy, keys, until, sampler), settings.repeats)
    rows = []
    for label, blocks in (("all blocks", ()), ("first block", (0,))):
        probe = replace(probe_settings(cfg), blocks=blocks)

        def probed(probe=probe) -> None:
            with AttentionEntropyProbe(policy.active_transformer, probe) as installed:
                anchor_latents(policy, keys, until, sampler, installed)

        seconds = median_seconds(probed, settings.repeats)
        rows.append({"probe": label, "anchors": len(keys), "steps": cfg.sampler.steps, "plain_s": plain,
                     "probed_s": seconds, "ratio": seconds / plain})
    return rows


# ----------------------------------------------------------------------------------------------- scheduler


def scheduler_cost(settings: Settings) -> list[dict[str, Any]]:
    """Median milliseconds of `Scheduler.draw` + `Scheduler.plan` per iteration (aegpo's plan from synthetic
    probe results, which a rollout worker would measure), and of `split_by_prompt` over N workers."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.txt"
        prompt_file.write_text("".join(f"prompt number {i}\n" for i in range(max(settings.scheduler_prompts))))
        for method, count in itertools.product(("grpo", "egrpo", METHOD), settings.scheduler_prompts):
            cfg = load_config(recipe(method), [f"data.prompts={prompt_file}", f"plan.prompts_per_iteration={count}"])
            scheduler = Scheduler(cfg)
            generator = torch.Generator().manual_seed(0)
            steps = cfg.aegpo_peak_steps  # what the probe pass measures
            probes = ProbeResult(torch.rand(count, steps, generator=generator),
                                 torch.rand(count, steps, generator=generator) + 0.5, 0)
            iterations = itertools.count()

            def plan_iteration(scheduler=scheduler, probes=probes, iterations=iterations) -> list:
                iteration = next(iterations)
                return scheduler.plan(iteration, probes if scheduler.draw(iteration) else None)

            plans = plan_iteration()
            row = {"method": method, "prompts": count, "samples": len(plans),
                   "plan_ms": 1e3 * median_seconds(plan_iteration, settings.repeats)}
            for workers in settings.scheduler_workers:
                row[f"split_ms_{workers}_workers"] = 1e3 * median_seconds(
                    lambda plans=plans, workers=workers: split_by_prompt(plans, workers), settings.repeats)
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- report


def plot_phases(runtime: dict[str, Any], path: Path) -> Path:
    """Stacked phase times per variant; under overlap, probe and schedule are inside learn and not drawn."""
    fig, (ax,) = figure(width=7.0, height=3.4)
    names = list(runtime["variants"])
    left = [0.0] * len(names)
    for phase in (*PHASES, "other"):
        widths = [0.0 if v["overlap"] and phase in PREFETCHED else max(0.0, v["phases"][phase])
                  for v in runtime["variants"].values()]
        ax.barh(names, widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds per iteration (mean)")
    ax.set_title(f"phases per iteration, {runtime['config']} (overlap: probe and schedule run inside learn)",
                 fontsize=8)
    ax.legend(fontsize=7, ncols=7, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return save_figure(fig, path)


def _log_axes(ax: Any, xticks: list[int] | None = None) -> None:
    """Log-log axes, with a grid and legend; `xticks` labels the measured x values as plain numbers."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    if xticks:
        ax.set_xticks(xticks, labels=[str(x) for x in xticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot_sync(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, (ax,) = figure()
    mib = [r["bytes"] / MiB for r in rows]
    for key, label in (("broadcast_s", "torch.distributed broadcast (gloo)"), ("object_store_s", "Ray object store")):
        ax.plot(mib, [r[key] for r in rows], "o-", label=label)
    ax.set_xlabel("state size (MiB)")
    ax.set_ylabel("seconds until every receiver has it")
    ax.set_title("weight sync: driver to rollout-worker stand-ins", fontsize=9)
    _log_axes(ax)
    return save_figure(fig, path)


def plot_scheduler(rows: list[dict[str, Any]], workers: tuple[int, ...], path: Path) -> Path:
    fig, (plan_ax, split_ax) = figure(panels=2, width=4.5)
    largest = max(r["prompts"] for r in rows)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        plan_ax.plot([r["prompts"] for r in mine], [r["plan_ms"] for r in mine], "o-", label=method)
        (top,) = [r for r in mine if r["prompts"] == largest]
        split_ax.plot(workers, [top[f"split_ms_{w}_workers"] for w in workers], "o-", label=method)
    plan_ax.set_xlabel("prompts per iteration")
    plan_ax.set_ylabel("ms per iteration (draw + plan)")
    split_ax.set_xlabel("rollout workers")
    split_ax.set_ylabel(f"ms to split the plan of {largest} prompts")
    _log_axes(plan_ax, sorted({r["prompts"] for r in rows}))
    _log_axes(split_ax, list(workers))
    return save_figure(fig, path)


def report(summary: dict[str, Any]) -> str:
    runtime = summary["runtime"]
    variants = runtime["variants"]
    lines = [f"machine: {describe_machine(summary['machine'])}", "",
             f"throughput ({runtime['config']}, {variants['ray']['iterations']} timed iterations per variant):",
             table(["variant", "startup s", "iteration s", "images/s", "in-process images/s, same blocks",
                    "x in-process", "staleness"],
                   [[n, v.get("startup_s"), v["iteration_s"], v["images_per_s"], v.get("in_process_images_per_s"),
                     v["throughput_ratio"], v["staleness_max"]] for n, v in variants.items()]), "",
             "phases (mean seconds per iteration):",
             table(["variant", *PHASES, "other"],
                   [[n, *(v["phases"][p] for p in (*PHASES, "other"))] for n, v in variants.items()]), "",
             "peak memory (MiB, VmHWM): " + ", ".join(f"{role} {mib:.0f}"
                                                      for role, mib in runtime["peak_memory_mib"].items()), "",
             "attention-probe overhead (anchor pass):",
             table(["probe", "anchors x steps", "without s", "with s", "ratio"],
                   [[r["probe"], f"{r['anchors']} x {r['steps']}", r["plain_s"], r["probed_s"], r["ratio"]]
                    for r in summary["probe"]]),
             "probe share of probe + rollout time in the loop: " + ", ".join(
                 f"{n} {v['probe_time_share']:.1%}" for n, v in variants.items()), "",
             "weight sync (median seconds to every receiver, GB/s per receiver):",
             table(["state", "MiB", "tensors", "broadcast s", "GB/s", "object store s", "GB/s"],
                   [[r["state"], r["bytes"] / MiB, r["tensors"], r["broadcast_s"], r["broadcast_gb_per_s"],
                     r["object_store_s"], r["object_store_gb_per_s"]] for r in summary["weight_sync"]]), "",
             "scheduler (median ms):"]
    workers = summary["settings"]["scheduler_workers"]
    lines.append(table(["method", "prompts", "samples", "draw + plan", *(f"split {w} workers" for w in workers)],
                       [[r["method"], r["prompts"], r["samples"], r["plan_ms"],
                         *(r[f"split_ms_{w}_workers"] for w in workers)] for r in summary["scheduler"]]))
    gpu = summary["gpu"]
    if gpu is not None and "skipped" in gpu:
        lines += ["", f"--gpu: {gpu['skipped']}"]
    elif gpu is not None:
        lines += ["", "FLUX-sized transformer on the GPU:", gpu_report(gpu)]
    return "\n".join(lines)


def main(quick: bool = False, gpu: bool = False, out: Path = Path("runs/bench/system")) -> int:
    """Run the benchmark (module docstring); write summary.json and the PNGs under `out`; print the tables.
    Starts a local Ray unless this process is already connected to one (then it is left running)."""
    settings = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary: dict[str, Any] = {"machine": machine(), "settings": asdict(settings)}
    summary["scheduler"] = scheduler_cost(settings)
    summary["probe"] = probe_overhead(settings)
    owns_ray = not ray.is_initialized()
    try:
        summary["runtime"] = runtime_comparison(settings, out)
        bucket = int(load_config(recipe(METHOD)).runtime.sync_bucket_mb * MiB)
        summary["weight_sync"] = measure_sync(sync_states(recipe(METHOD), settings.sync_mib),
                                              settings.sync_receivers, bucket, settings.repeats)
    finally:
        if owns_ray:
            ray.shutdown()
    summary["gpu"] = None
    if gpu:
        if torch.cuda.is_available():
            summary["gpu"] = flux_measurements(FLUX_DEV, torch.device("cuda"), torch.bfloat16, quick)
        else:
            summary["gpu"] = {"skipped": "CUDA is not available on this machine: the FLUX-sized section did not run"}
    summary["figures"] = {
        "phases": str(plot_phases(summary["runtime"], out / "phases.png")),
        "weight_sync": str(plot_sync(summary["weight_sync"], out / "weight_sync.png")),
        "scheduler": str(plot_scheduler(summary["scheduler"], settings.scheduler_workers, out / "scheduler.png")),
    }
    summary["wall_seconds"] = time.perf_counter() - start
    path = write_summary(out, summary)
    print(report(summary))
    print(f"\nwrote {path} and {', '.join(summary['figures'].values())}")
    return 0
