"""`egrpo bench algorithms`: sample efficiency of the plan methods on the toy world, at one budget.

Each method trains with its own recipe (launch/configs/toy-<method>.yaml; `aegpo-independent` is the aegpo
recipe with AEGPO's other reading) from the same base model, in the in-process loop (deterministic for a seed),
for several seeds, until it has spent the same budget of model evaluations: the NFE that `grpo` (the
DanceGRPO-like baseline) spends in its recipe's iterations. NFE counts every transformer forward of rollout and
training, one per distinct input state (samples in the same state share one: a group's branches before they
explore, a tree node's children); per iteration:

    nfe/rollout     anchors and branches (egrpo.sampling.rollout.run_plan)
  + nfe/probe       aegpo's anchor pass with attention probes over the steps where it looks for peaks (current
                    policy, and the reference policy for prompts it has not seen); the rollout reuses its anchors
  + nfe/train       the learner's forwards: old log-probs, then per epoch the loss's (and the reference's for KL)

Backward passes are not counted (one per loss forward, about two forwards each). Held-out
evaluations are not training cost: they are outside the budget and outside the clock.

Reported per method: held-out reward against NFE and against training wall clock (mean over seeds, min-max
band); the NFE and seconds from which the seed-mean curve stays at or above grpo's final reward (`reach`),
as ratios to grpo's own, and how many single seeds do so; the final reward over seeds; for aegpo, its
probes' share of probe + rollout time.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from egrpo.bench.common import (
    describe_machine,
    figure,
    machine,
    recipe,
    save_figure,
    table,
    write_summary,
)
from egrpo.config import load_config
from egrpo.trainer import Trainer

METHODS = ("grpo", "mix", "egrpo", "aegpo", "aegpo-independent", "branch")
VARIANTS = {"aegpo-independent": ("aegpo", ["aegpo.rollout=independent", "plan.group_size=8"])}  # recipe, overrides
BASELINE = "grpo"
NFE_RATIO_TARGET = 0.5  # E-GRPO and AEGPO should reach grpo's final reward with at most half its NFE
PROBE_SHARE_TARGET = 0.05  # AEGPO's probes should cost at most 5% of probe + rollout time (entropy/probe_time_share)


@dataclass(frozen=True)
class Settings:
    seeds: int
    baseline_iterations: int  # grpo's iterations; the NFE it spends in them is every method's budget
    evals: int  # held-out evaluations after the initial one, evenly spaced over the budget
    eval_prompts: int
    eval_seeds: int


FULL = Settings(seeds=5, baseline_iterations=80, evals=10, eval_prompts=12, eval_seeds=4)
QUICK = Settings(seeds=1, baseline_iterations=6, evals=2, eval_prompts=4, eval_seeds=2)


def iteration_nfe(metrics: dict[str, Any]) -> dict[str, int]:
    """Transformer forwards of one iteration, by where they were spent (the module docstring)."""
    return {phase: int(metrics.get(f"nfe/{phase}", 0)) for phase in ("rollout", "probe", "train")}


def evaluation(trainer: Trainer, iteration: int, nfe: int, seconds: float) -> dict[str, Any]:
    """Held-out reward now (ODE samples of fixed held-out prompts and seeds), with where the run stands."""
    metrics, _ = trainer.evaluate()
    return {"iteration": iteration, "nfe": nfe, "seconds": seconds, "reward": metrics["eval/reward_mean"],
            **{key.removeprefix("eval/"): value for key, value in metrics.items() if key != "eval/reward_mean"}}


def train_on_budget(trainer: Trainer, progress: Callable[[int, int], float], evals: int) -> dict[str, Any]:
    """Iterate until `progress(iterations, nfe)` reaches 1, evaluating at the start and whenever progress
    crosses a multiple of 1 / evals: curve[k] is the evaluation at progress k / evals (an iteration that
    crosses two of them fills both with the same evaluation). Evaluation is outside the clock."""
    curve = [evaluation(trainer, 0, 0, 0.0)]
    iterations, seconds = 0, 0.0
    spent = {"rollout": 0, "probe": 0, "train": 0}
    phase_seconds = {"probe": 0.0, "rollout": 0.0}
    while progress(iterations, sum(spent.values())) < 1:
        start = time.perf_counter()
        metrics = trainer.iteration(iterations)
        seconds += time.perf_counter() - start
        iterations += 1
        for key, value in iteration_nfe(metrics).items():
            spent[key] += value
        for phase in phase_seconds:
            phase_seconds[phase] += metrics.get(f"time/{phase}", 0.0)
        nfe = sum(spent.values())
        record = {"iteration": iterations, "bench/nfe": nfe, "bench/seconds": seconds, **metrics}
        crossed = min(evals, math.floor(progress(iterations, nfe) * evals + 1e-9))
        if crossed >= len(curve):
            point = evaluation(trainer, iterations, nfe, seconds)
            curve += [point] * (crossed + 1 - len(curve))
            record["eval/reward_mean"] = point["reward"]
        trainer.log.log(record)
    probed = phase_seconds["probe"] > 0
    return {"iterations": iterations, "nfe": sum(spent.values()), "nfe_split": spent, "seconds": seconds,
            "curve": curve,
            "probe_time_share": phase_seconds["probe"] / sum(phase_seconds.values()) if probed else None}


def run_method(method: str, seed: int, budget: int | None, settings: Settings, out: Path) -> dict[str, Any]:
    """One training run of `method`'s recipe: the baseline's recipe iterations when `budget` is None, else
    until it has spent `budget` NFE. Its metrics.jsonl goes to out/runs/<method>-seed<seed>/."""
    name, variant = VARIANTS.get(method, (method, []))
    overrides = [*variant, f"run.seed={seed}", f"run.dir={out / 'runs'}", f"run.name={method}-seed{seed}",
                 "run.wandb=disabled", "runtime.backend=local", f"train.eval_prompts={settings.eval_prompts}",
                 f"train.eval_seeds={settings.eval_seeds}"]
    if budget is None:
        overrides.append(f"train.iterations={settings.baseline_iterations}")
    trainer = Trainer(load_config(recipe(name), overrides))

    def progress(iterations: int, nfe: int) -> float:
        return iterations / settings.baseline_iterations if budget is None else nfe / budget

    try:
        run = train_on_budget(trainer, progress, settings.evals)
    finally:
        trainer.close()
    return {"method": method, "seed": seed, **run}


# ------------------------------------------------------------------------------------------------ summary


def reach(xs: list[float], ys: list[float], target: float) -> float | None:
    """The x from which the piecewise-linear curve (xs, ys) stays at or above `target` to its end; None if it
    ends below. A held-out curve is noisy, so a first touch of the target is not counted as reaching it:
    after the last evaluation below the target, the x is interpolated linearly to the next one."""
    if ys[-1] < target:
        return None
    below = [k for k, y in enumerate(ys) if y < target]
    if not below:
        return xs[0]
    k = below[-1]
    return xs[k] + (target - ys[k]) / (ys[k + 1] - ys[k]) * (xs[k + 1] - xs[k])


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return value / baseline if value is not None and baseline else None


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "seeds": values}


def mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per evaluation index: mean NFE and seconds over seeds, and the reward's mean, min and max."""
    points = []
    for k in range(len(runs[0]["curve"])):
        at = [run["curve"][k] for run in runs]
        rewards = [p["reward"] for p in at]
        points.append({"nfe": statistics.fmean(p["nfe"] for p in at),
                       "seconds": statistics.fmean(p["seconds"] for p in at),
                       "reward": statistics.fmean(rewards), "reward_min": min(rewards), "reward_max": max(rewards)})
    return points


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method: curves, final reward over seeds, NFE and seconds to the baseline's final reward (and their
    ratios to the baseline's), NFE spent by phase, probe time share; and the project's targets."""
    target = statistics.fmean(run["curve"][-1]["reward"] for run in runs[BASELINE])
    methods: dict[str, dict[str, Any]] = {}
    for method, seed_runs in runs.items():
        curve = mean_curve(seed_runs)
        rewards = [p["reward"] for p in curve]
        total = statistics.fmean(run["nfe"] for run in seed_runs)
        iterations = statistics.fmean(run["iterations"] for run in seed_runs)
        shares = [run["probe_time_share"] for run in seed_runs if run["probe_time_share"] is not None]
        methods[method] = {
            "final_reward": _spread([run["curve"][-1]["reward"] for run in seed_runs]),
            "start_reward": curve[0]["reward"],
            "nfe_to_target": reach([p["nfe"] for p in curve], rewards, target),
            "seconds_to_target": reach([p["seconds"] for p in curve], rewards, target),
            "nfe_to_target_per_seed": [
                reach([p["nfe"] for p in run["curve"]], [p["reward"] for p in run["curve"]], target)
                for run in seed_runs],
            "iterations": iterations, "nfe": total, "nfe_per_iteration": total / iterations,
            "nfe_share": {key: statistics.fmean(run["nfe_split"][key] / run["nfe"] for run in seed_runs)
                          for key in seed_runs[0]["nfe_split"]},
            "seconds": statistics.fmean(run["seconds"] for run in seed_runs),
            "probe_time_share": statistics.fmean(shares) if shares else None,
            "curve": curve,
        }
    baseline = methods[BASELINE]
    for summary in methods.values():
        summary["nfe_ratio"] = _ratio(summary["nfe_to_target"], baseline["nfe_to_target"])
        summary["seconds_ratio"] = _ratio(summary["seconds_to_target"], baseline["seconds_to_target"])
    targets = {}
    for method in ("egrpo", "aegpo", "aegpo-independent"):
        ratio, final = methods[method]["nfe_ratio"], methods[method]["final_reward"]["mean"]
        targets[f"{method} reaches grpo's final reward with <= {NFE_RATIO_TARGET:g}x its NFE and ends above it"] = {
            "value": ratio, "met": ratio is not None and ratio <= NFE_RATIO_TARGET and final > target}
    for method in ("aegpo", "aegpo-independent"):
        share = methods[method]["probe_time_share"]
        targets[f"{method}'s probes cost <= {PROBE_SHARE_TARGET:.0%} of probe + rollout time"] = {
            "value": share, "met": share is not None and share <= PROBE_SHARE_TARGET}
    return {"target_reward": target, "methods": methods, "targets": targets}


def plot(summary: dict[str, Any], x: str, label: str, path: Path) -> Path:
    """Held-out reward against `x` (nfe or seconds): seed means with a min-max band, and grpo's final reward."""
    fig, (ax,) = figure()
    for method, s in summary["methods"].items():
        xs = [p[x] for p in s["curve"]]
        ax.plot(xs, [p["reward"] for p in s["curve"]], "o-", ms=3, label=method)
        ax.fill_between(xs, [p["reward_min"] for p in s["curve"]], [p["reward_max"] for p in s["curve"]],
                        alpha=0.15)
    ax.axhline(summary["target_reward"], ls="--", lw=1, color="grey", label="grpo's final reward")
    ax.set_xlabel(label)
    ax.set_ylabel("held-out reward (colour + position)")
    seeds = len(summary["methods"][BASELINE]["final_reward"]["seeds"])
    ax.set_title(f"toy world, equal NFE budget ({seeds} seed{'s' * (seeds > 1)}: mean, min-max)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def report(summary: dict[str, Any]) -> str:
    rows = []
    for method, s in summary["methods"].items():
        final = s["final_reward"]
        reached = sum(nfe is not None for nfe in s["nfe_to_target_per_seed"])
        rows.append([method, round(s["iterations"], 1), round(s["nfe_per_iteration"]), round(s["nfe"]),
                     f"{final['mean']:.3f} ± {final['std']:.3f} [{final['min']:.3f}, {final['max']:.3f}]",
                     f"{reached}/{len(final['seeds'])}", s["nfe_to_target"], s["nfe_ratio"],
                     s["seconds_to_target"], s["seconds_ratio"], s["probe_time_share"]])
    lines = [f"machine: {describe_machine(summary['machine'])}",
             f"budget: {summary['budget_nfe']:,.0f} NFE (grpo's {summary['settings']['baseline_iterations']} "
             f"iterations); target: grpo's final held-out reward {summary['target_reward']:.3f}", "",
             table(["method", "iterations", "NFE/iter", "NFE spent", "final reward (mean ± std [min, max])",
                    "seeds reaching", "NFE to target", "x grpo", "s to target", "x grpo", "probe share"], rows), ""]
    for name, target in summary["targets"].items():
        value = "not reached" if target["value"] is None else f"{target['value']:.3f}"
        lines.append(f"target: {name}: {value} ({'met' if target['met'] else 'missed'})")
    return "\n".join(lines)


def main(quick: bool = False, seeds: int | None = None, out: Path = Path("runs/bench/algorithms")) -> int:
    """Run the benchmark (module docstring); write summary.json and the PNGs under `out`; print the table."""
    settings = QUICK if quick else FULL
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        settings = replace(settings, seeds=seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in METHODS}
    for seed in range(settings.seeds):
        baseline = run_method(BASELINE, seed, None, settings, out)
        runs[BASELINE].append(baseline)
        for method in METHODS:
            if method != BASELINE:
                runs[method].append(run_method(method, seed, baseline["nfe"], settings, out))
    summary = {"machine": machine(), "settings": asdict(settings),
               "budget_nfe": statistics.fmean(run["nfe"] for run in runs[BASELINE]), **summarize(runs),
               "runs": runs}
    summary["figures"] = {
        "reward_vs_nfe": str(plot(summary, "nfe", "model evaluations (NFE, rollout + training)",
                                  out / "reward_vs_nfe.png")),
        "reward_vs_time": str(plot(summary, "seconds", "training wall clock (s, evaluation excluded)",
                                   out / "reward_vs_time.png")),
    }
    summary["wall_seconds"] = time.perf_counter() - start
    path = write_summary(out, summary)
    print(report(summary))
    print(f"\nwrote {path} and {', '.join(summary['figures'].values())}")
    return 0
