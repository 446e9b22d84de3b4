"""`egrpo bench probe`: how much of AEGPO's attention-entropy probe its two signals need, and what it costs.

AEGPO (ALGORITHMS.md section 3) probes the attention entropy E(t) along each prompt's ODE anchor, under the
current policy and the reference, for two signals: the global dE = mean_t |E_theta(t) - E_ref(t)| / E_ref(t),
which sets the rollouts per prompt (median split), and the local top-k peaks of E_theta(t) among the first T/2
steps, where the rollouts explore. This benchmark measures how well cheaper probes keep both, and how their
cost compares with a forward and with a rollout.

A policy that differs from its base: the toy AEGPO recipe (launch/configs/toy-aegpo.yaml) trains in the
in-process loop and is measured after some iterations (full mode: after 10 and after 30, as two "models");
`t.policy.reference()` is the base. With `tiny`, the same is done on a
bigger tiny FLUX (egrpo.models.tiny: more blocks, heads and image tokens than the toy model; random weights,
trained with a larger learning rate so that it moves in few iterations).

Measured, for a fixed set of training prompts (one fixed initial-noise seed each):

- Curves. Our own Euler ODE anchor loop (x <- x + (sigma' - sigma) v on the run's schedule), once under the
  policy and once under the reference, all prompts in one batch, with one `AttentionEntropyProbe` installed
  per distinct candidate setting at once: the probes see the same forwards, so every setting's E(t) is that
  setting's measurement of the same trajectories (a probe never changes the transformer's output).
- Ground truth: the FULL probe, every block, every head, every image row (rows = image tokens), all T steps.
  Candidates: blocks (all, first, first 2, every other, last) x heads (all, 1, half) x rows (4, 8, 16, 32, 64,
  all) x steps (all T, or only the first T/2: dE over those steps only; peaks look at the first T/2 anyway).
- Per candidate: (a) Spearman rank correlation of its dE with the full probe's across prompts; agreement of
  the median split (fraction of prompts on the same side: dE >= median, the median as egrpo.algo.budgets
  takes it) over all measured prompts, and over consecutive batches of the recipe's prompts per iteration;
  (b) the top-k peaks of E_theta among the first T/2 steps (egrpo.sampling.plans.entropy_peaks): mean
  Jaccard over prompts with the full probe's peak sets; (c) cost: seconds of a probed forward relative to an
  unprobed one, on the recipe's probe batch (its prompts per iteration), median over repeats of the paired
  ratio, probed and unprobed forwards alternating in one run; and the probe pass (the anchor forwards over the
  candidate's steps, batch = prompts per iteration) relative to the recipe's rollout: the trainer's own median
  `time/rollout` over the training iterations (its trees' shared forwards, the anchors it reuses from the
  probe), with, for scale, an estimate of prompts x group size samples taking T independent unprobed steps in
  batches of sampler.batch_size, timed with the forwards. Shares: pass / (pass + rollout) with E_ref cached
  (current policy only), with the reference probed too (a prompt not seen before), and the probe's hooks alone
  (probed pass minus the same pass unprobed: the share if every anchor forward were reused by the rollout).
  The trainer's own `entropy/probe_time_share` while training is kept as a cross-check. Only the one-axis
  candidates, the passing ones and the nearest misses are timed.

A candidate passes when dE's rank correlation >= 0.9, the median-split agreement (over all measured prompts)
>= 90% and the peak Jaccard >= 0.8, in every measured model; the recommendation is the passing candidate of
least mean pass cost; the nearest miss is the cheaper candidate whose worst criterion, as a fraction of its
threshold, is highest in every model. The target (algorithms.PROBE_SHARE_TARGET) is a probe share of at most
5% of probe + rollout time. Written under `out`: summary.json (every candidate's accuracy and dE, costs of the
timed ones, E(t) curves of the shown ones) and entropy_curves.png (E(t) of a few prompts: full probe vs the
recommendation, or vs the model's nearest miss when the recommendation is the full probe).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from egrpo.algo.budgets import at_or_above_median, relative_entropy_change
from egrpo.bench.common import describe_machine, figure, machine, recipe, save_figure, table, write_summary
from egrpo.entropy.attention import AttentionEntropyProbe, ProbeSettings, probed_attentions

RANK_TARGET = 0.9  # Spearman of dE with the full probe's
SPLIT_TARGET = 0.9  # fraction of prompts on the same side of the median split
PEAK_TARGET = 0.8  # mean Jaccard of the peak sets
SHARE_TARGET = 0.05  # the probe's share of probe + rollout time (algorithms.PROBE_SHARE_TARGET)
SEED_BASE = 20_000  # prompt j's initial noise uses seed SEED_BASE + j
SHOWN_PROMPTS = 3  # prompts in the E(t) figure

BLOCK_CHOICES = ("all", "first", "first2", "every-other", "last")
HEAD_CHOICES = ("all", "one", "half")
ROW_CHOICES: tuple[int | None, ...] = (None, 64, 32, 16, 8, 4)  # None = every image row
STEP_CHOICES = ("T", "T/2")


@dataclass(frozen=True)
class Settings:
    prompts: int  # training prompts measured, evenly spaced over data.prompts
    iterations: tuple[int, ...]  # toy-recipe iterations trained before each measurement (one training run)
    repeats: int  # timed (unprobed, probed) forward pairs per candidate probe
    tiny: bool  # also measure the bigger tiny FLUX
    tiny_iterations: tuple[int, ...]


FULL = Settings(prompts=16, iterations=(10, 30), repeats=11, tiny=True, tiny_iterations=(3,))
QUICK = Settings(prompts=8, iterations=(2,), repeats=3, tiny=False, tiny_iterations=(1,))
MAX_TIMED = 24  # passing candidates timed beyond the one-axis ones, those probing the fewest units first
NEAR_MISSES = 3  # failing multi-axis candidates timed (and shown) too, those closest to passing

# The bigger tiny FLUX: 2 double- and 4 single-stream blocks of 8 heads, 48 x 48 pixels = 144 image tokens
# (the toy model: 2 + 2 blocks of 4 heads, 64 image tokens), random weights, random text encoders. It trains
# at 30x the recipe's rate, so that its dE is of the toy's size after a few iterations.
TINY_MODEL = {"num_layers": 2, "num_single_layers": 4, "num_attention_heads": 8, "attention_head_dim": 16,
              "vae": False, "pixel_unshuffle": 2}
TINY_SIZE = 48
TINY_TEXT_TOKENS = 16
TINY_OVERRIDES = ["train.lr=3.0e-2"]


@dataclass(frozen=True)
class Candidate:
    """A probe setting, in terms relative to the model (so one candidate names the same choice in both)."""

    blocks: str
    heads: str
    rows: int | None  # None = every image row
    steps: str  # "T": every step; "T/2": the first half only

    @property
    def name(self) -> str:
        return f"blocks={self.blocks} heads={self.heads} rows={self.rows or 'all'} steps={self.steps}"

    def probe(self, blocks: int, heads: int, image_tokens: int, seed: int) -> ProbeSettings:
        """The ProbeSettings of this candidate on a model with these counts; `seed` picks the sampled rows, as
        the trainer's probe does with run.seed."""
        chosen = {"all": (), "first": (0,), "first2": (0, 1), "every-other": tuple(range(0, blocks, 2)),
                  "last": (blocks - 1,)}[self.blocks]
        picked = {"all": (), "one": (0,), "half": tuple(range(max(1, heads // 2)))}[self.heads]
        if len(chosen) == blocks:
            chosen = ()
        if len(picked) == heads:
            picked = ()
        rows = image_tokens if self.rows is None else min(self.rows, image_tokens)
        return ProbeSettings(blocks=chosen, heads=picked, rows=rows, seed=seed)


FULL_PROBE = Candidate("all", "all", None, "T")
CANDIDATES = [Candidate(*c) for c in itertools.product(BLOCK_CHOICES, HEAD_CHOICES, ROW_CHOICES, STEP_CHOICES)]


# ------------------------------------------------------------------------------------------------ statistics


def ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda k: values[k])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in order[start : end + 1]:
            result[k] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's of the tie-averaged ranks); None when either side is constant."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var > 0 else None


def split_agreement(a: Sequence[float], b: Sequence[float], batch: int | None = None) -> float:
    """Fraction of prompts on the same side of the median split under a and b: over all prompts, or with
    the split taken within consecutive batches of `batch` prompts (a last partial batch included)."""
    batch = batch or len(a)
    same = 0
    for start in range(0, len(a), batch):
        sa, sb = at_or_above_median(a[start : start + batch]), at_or_above_median(b[start : start + batch])
        same += sum(x == y for x, y in zip(sa, sb, strict=True))
    return same / len(a)


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


# ------------------------------------------------------------------------------------------------ the models


def make_trainer(config: Path, overrides: list[str], run_dir: Path) -> Any:
    """The recipe's in-process Trainer (no Ray, no wandb), its run under `run_dir`."""
    from egrpo.config import load_config
    from egrpo.trainer import Trainer

    return Trainer(load_config(config, ["runtime.backend=local", "run.wandb=disabled", f"run.dir={run_dir}",
                                        "run.name=probe-bench", *overrides]))


def train(trainer: Any, start: int, stop: int, overrides: list[str]) -> dict[str, Any]:
    """Iterations start..stop-1 of the trainer; with what its own metrics say about the probe's share of
    probe + rollout time over them."""
    began = time.perf_counter()
    records = [trainer.iteration(k) for k in range(start, stop)]
    seconds = time.perf_counter() - began

    def median_of(key: str) -> float | None:
        values = [r[key] for r in records if key in r]
        return statistics.median(values) if values else None

    return {"iterations": stop, "seconds": seconds, "overrides": overrides,
            "trainer_probe_share": median_of("entropy/probe_time_share"),
            "trainer_time_probe": median_of("time/probe"), "trainer_time_rollout": median_of("time/rollout"),
            "trainer_nfe_probe": median_of("nfe/probe"), "trainer_nfe_rollout": median_of("nfe/rollout"),
            "dE_mean_last": records[-1].get("entropy/dE_mean") if records else None}


def build_tiny(folder: Path) -> Path:
    """Save the bigger tiny FLUX (TINY_MODEL) under `folder`, as a model.path."""
    from egrpo.models.families.flux import build_flux_pipeline
    from egrpo.models.tiny import save_pipeline

    pipe = build_flux_pipeline(**TINY_MODEL)
    save_pipeline(pipe, folder, height=TINY_SIZE, width=TINY_SIZE, pixel_unshuffle=TINY_MODEL["pixel_unshuffle"],
                  max_sequence_length=TINY_TEXT_TOKENS)
    return folder


def pick_prompts(prompts: list[str], count: int) -> list[str]:
    """`count` prompts evenly spaced over the list (the toy split is ordered by colour, then shape)."""
    count = min(count, len(prompts))
    return [prompts[k * len(prompts) // count] for k in range(count)]


@torch.no_grad()
def probed_curves(policy: Any, prompts: list[str], seeds: list[int], sigmas: torch.Tensor,
                  settings: list[ProbeSettings]) -> list[torch.Tensor]:
    """E(t) of each probe setting along the policy's ODE anchors: one (prompts, T) tensor per setting, all
    probes installed on the same forwards."""
    steps = len(sigmas) - 1
    cond = policy.encode_prompts(prompts)
    x = policy.initial_noise(seeds)
    curves = [torch.empty(len(prompts), steps) for _ in settings]
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(AttentionEntropyProbe(policy.active_transformer, s)) for s in settings]
        for i in range(steps):
            v = policy.velocity(x, float(sigmas[i]), cond)
            for curve, probe in zip(curves, probes, strict=True):
                curve[:, i] = probe.take().float().cpu()
            x = x + float(sigmas[i + 1] - sigmas[i]) * v
    return curves


# ------------------------------------------------------------------------------------------------ timing


@torch.no_grad()
def time_forwards(policy: Any, prompts: list[str], seeds: list[int], sigma: float, rollout_batch: int,
                  settings: list[ProbeSettings], repeats: int) -> dict[str, Any]:
    """Seconds of unprobed and probed forwards on the probe batch (`prompts`), and of an unprobed forward on
    the rollout batch. Each round times, per setting, an unprobed and a probed forward back to back (their
    order alternating between rounds); a setting's cost is the median over rounds of probed / unprobed. A
    first round warms up and is not counted."""
    cond = policy.encode_prompts(prompts)
    x = policy.initial_noise(seeds)
    reps = -(-rollout_batch // len(prompts))
    rollout_cond = {key: value.repeat(reps, *([1] * (value.ndim - 1)))[:rollout_batch] for key, value in cond.items()}
    rollout_x = x.repeat(reps, *([1] * (x.ndim - 1)))[:rollout_batch]
    probes = [AttentionEntropyProbe(policy.active_transformer, s) for s in settings]

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def probed(probe: AttentionEntropyProbe) -> float:
        with probe:
            return timed(lambda: (policy.velocity(x, sigma, cond), probe.take()))

    def plain() -> float:
        return timed(lambda: policy.velocity(x, sigma, cond))

    ratios: list[list[float]] = [[] for _ in settings]
    probed_s: list[list[float]] = [[] for _ in settings]
    plain_s: list[float] = []
    rollout_s: list[float] = []
    for round_ in range(repeats + 1):
        rollout = timed(lambda: policy.velocity(rollout_x, sigma, rollout_cond))
        for k, probe in enumerate(probes):
            if round_ % 2:
                p, u = probed(probe), plain()
            else:
                u, p = plain(), probed(probe)
            if round_:
                ratios[k].append(p / u)
                probed_s[k].append(p)
                plain_s.append(u)
        if round_:
            rollout_s.append(rollout)
    return {"forward_s": statistics.median(plain_s), "rollout_forward_s": statistics.median(rollout_s),
            "probed_forward_s": [statistics.median(s) for s in probed_s],
            "forward_cost": [statistics.median(r) for r in ratios]}


# ------------------------------------------------------------------------------------------------ one model


def units(probe: ProbeSettings, blocks: int, heads: int, image_tokens: int) -> float:
    """Fraction of the (block, head, image row) triples that a probe measures."""
    return ((len(probe.blocks) or blocks) / blocks * (len(probe.heads) or heads) / heads
            * min(probe.rows, image_tokens) / image_tokens)


def measure_model(label: str, trainer: Any, training: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Every candidate's accuracy on one trained policy, and the cost of the one-axis and the passing ones
    (module docstring)."""
    from egrpo.data.prompts import load_prompts
    from egrpo.methods import schedule_sigmas
    from egrpo.sampling.plans import entropy_peaks

    cfg, policy = trainer.cfg, trainer.policy
    attentions = probed_attentions(policy.active_transformer)
    blocks, heads = len(attentions), attentions[0].heads
    image_tokens = policy.latent_shape[0]
    steps, peak_steps, top_k = cfg.sampler.steps, cfg.aegpo_peak_steps, cfg.aegpo.peaks
    sigmas = schedule_sigmas(cfg)
    prompts = pick_prompts(load_prompts(cfg.data.prompts), settings.prompts)
    seeds = [SEED_BASE + j for j in range(len(prompts))]

    # Accuracy: every distinct probe on the same anchor forwards, policy then reference.
    probe_of = {c: c.probe(blocks, heads, image_tokens, cfg.run.seed) for c in [FULL_PROBE, *CANDIDATES]}
    distinct = list(dict.fromkeys(probe_of.values()))
    start = time.perf_counter()
    theta = dict(zip(distinct, probed_curves(policy, prompts, seeds, sigmas, distinct), strict=True))
    with policy.reference():
        ref = dict(zip(distinct, probed_curves(policy, prompts, seeds, sigmas, distinct), strict=True))
    curve_seconds = time.perf_counter() - start

    full = probe_of[FULL_PROBE]
    full_dE = relative_entropy_change(theta[full], ref[full]).tolist()
    full_peaks = [entropy_peaks(row[:peak_steps].tolist(), top_k) for row in theta[full]]
    results = []
    for c in CANDIDATES:
        s = probe_of[c]
        n = steps if c.steps == "T" else max(1, steps // 2)
        dE = relative_entropy_change(theta[s][:, :n], ref[s][:, :n]).tolist()
        peaks = [entropy_peaks(row[:peak_steps].tolist(), top_k) for row in theta[s]]
        rho = spearman(dE, full_dE)
        split = split_agreement(dE, full_dE)
        peak_j = statistics.fmean(jaccard(a, b) for a, b in zip(peaks, full_peaks, strict=True))
        results.append({
            "name": c.name, **asdict(c),
            "probe": {"blocks": list(s.blocks), "heads": list(s.heads), "rows": s.rows},
            "units": units(s, blocks, heads, image_tokens), "pass_steps": n,
            "dE_spearman": rho, "split_agreement": split,
            "split_agreement_per_iteration": split_agreement(dE, full_dE, cfg.plan.prompts_per_iteration),
            "peak_jaccard": peak_j, "E_abs_error": float((theta[s] - theta[full]).abs().mean()),
            "passes": rho is not None and rho >= RANK_TARGET and split >= SPLIT_TARGET and peak_j >= PEAK_TARGET,
            "dE": dE,
        })

    # Cost: the probes of the one-axis candidates, the passing ones and the near misses, side by side.
    passing = sorted((r for r in results if r["passes"] and not one_axis(r)), key=lambda r: r["units"] * r["pass_steps"])
    near = sorted((r for r in results if not r["passes"] and not one_axis(r)), key=margin, reverse=True)[:NEAR_MISSES]
    timed_results = [r for r in results if one_axis(r)] + passing[:MAX_TIMED] + near
    full_row = next(r for r in results if r["name"] == FULL_PROBE.name)
    closest = max((r for r in results if r["probe"] != full_row["probe"] and r["steps"] == "T"), key=margin)
    timed = list(dict.fromkeys(probe_of[Candidate(r["blocks"], r["heads"], r["rows"], r["steps"])]
                               for r in timed_results))
    batch = cfg.plan.prompts_per_iteration
    samples = cfg.plan.prompts_per_iteration * cfg.plan.group_size
    rollout_batch = min(cfg.sampler.batch_size, samples)
    start = time.perf_counter()
    timing = time_forwards(policy, prompts[:batch], seeds[:batch], float(sigmas[steps // 2]), rollout_batch,
                           timed, settings.repeats)
    timing_seconds = time.perf_counter() - start
    cost = dict(zip(timed, timing["forward_cost"], strict=True))
    probed_s = dict(zip(timed, timing["probed_forward_s"], strict=True))
    # The rollout: the trainer's own (its trees' shared forwards, the reused anchors) when it measured one,
    # else every sample's T forwards in batches of sampler.batch_size, timed here.
    rollout_estimate_s = steps * -(-samples // rollout_batch) * timing["rollout_forward_s"]
    rollout_s = training.get("trainer_time_rollout") or rollout_estimate_s
    for r in timed_results:
        s, n = probe_of[Candidate(r["blocks"], r["heads"], r["rows"], r["steps"])], r["pass_steps"]
        # From the paired ratio and the common unprobed median: absolute medians drift with the machine's load.
        pass_s = n * cost[s] * timing["forward_s"]
        overhead_s = n * max(0.0, cost[s] - 1) * timing["forward_s"]
        r.update({"forward_cost": cost[s], "probed_forward_s": probed_s[s], "pass_vs_rollout": pass_s / rollout_s,
                  "share": pass_s / (pass_s + rollout_s),
                  "share_with_reference": 2 * pass_s / (2 * pass_s + rollout_s),
                  "share_overhead": overhead_s / (overhead_s + rollout_s)})
    unprobed = steps * timing["forward_s"]  # the anchor pass itself, for scale
    shown = {FULL_PROBE.name, closest["name"]} | {Candidate(r["blocks"], r["heads"], r["rows"], "T").name
                                                  for r in timed_results}
    return {
        "label": label,
        "model": {"blocks": blocks, "heads": heads, "image_tokens": image_tokens, "steps": steps,
                  "peak_steps": peak_steps, "peaks": top_k, "probe_batch": batch, "rollout_samples": samples,
                  "rollout_batch": rollout_batch, "recipe_probe_rows": cfg.aegpo.probe_rows},
        "training": training, "prompts": prompts, "seeds": seeds,
        "full_dE": full_dE, "full_peaks": full_peaks,
        "timing": {"forward_s": timing["forward_s"], "rollout_forward_s": timing["rollout_forward_s"],
                   "rollout_s": rollout_s, "rollout_estimate_s": rollout_estimate_s,
                   "rollout_measured_by_trainer": rollout_s != rollout_estimate_s, "unprobed_pass_share": unprobed / (unprobed + rollout_s),
                   "repeats": settings.repeats, "curve_seconds": curve_seconds, "timing_seconds": timing_seconds,
                   "probes_measured": len(distinct), "probes_timed": len(timed)},
        "curves": {name: {"theta": _rounded(theta[probe_of[c]]), "reference": _rounded(ref[probe_of[c]])}
                   for c in [FULL_PROBE, *CANDIDATES] if (name := c.name) in shown},
        "closest": closest["name"],  # the full-T candidate nearest to passing (or passing best): the figure's
        "candidates": results,
    }


def margin(candidate: dict[str, Any]) -> float:
    """How close a candidate comes to passing: its worst criterion as a fraction of its threshold (>= 1:
    passes)."""
    rho = candidate["dE_spearman"]
    return min(-1.0 if rho is None else rho / RANK_TARGET, candidate["split_agreement"] / SPLIT_TARGET,
               candidate["peak_jaccard"] / PEAK_TARGET)


def _rounded(curves: torch.Tensor) -> list[list[float]]:
    return [[round(v, 6) for v in row] for row in curves.tolist()]


# ------------------------------------------------------------------------------------------------ summary


def recommend(models: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate that passes in every model with the least mean pass cost (pass / rollout), if any; and
    the cheaper candidate that comes nearest to passing in every model (the largest worst `margin`)."""
    by_name = [{r["name"]: r for r in m["candidates"]} for m in models]
    names = list(by_name[0])
    passing = [n for n in names if all(b[n]["passes"] and "pass_vs_rollout" in b[n] for b in by_name)]

    def mean_cost(name: str) -> float:
        return statistics.fmean(b[name]["pass_vs_rollout"] for b in by_name)

    best = min(passing, key=mean_cost) if passing else None
    result: dict[str, Any] = {"criteria": {"dE_spearman": RANK_TARGET, "split_agreement": SPLIT_TARGET,
                                           "peak_jaccard": PEAK_TARGET},
                              "passing": sorted(passing, key=mean_cost), "recommended": best}
    others = [n for n in names if n != FULL_PROBE.name and n not in passing]
    if others:
        near = max(others, key=lambda n: min(margin(b[n]) for b in by_name))
        result["near_miss"] = {"name": near, **{
            m["label"]: {key: b[near][key] for key in ("dE_spearman", "split_agreement", "peak_jaccard", "units")}
            for m, b in zip(models, by_name, strict=True)}}
    if best is not None:
        share = max(b[best]["share"] for b in by_name)
        result.update({
            "share": {m["label"]: b[best]["share"] for m, b in zip(models, by_name, strict=True)},
            "share_with_reference": {m["label"]: b[best]["share_with_reference"]
                                     for m, b in zip(models, by_name, strict=True)},
            "share_overhead": {m["label"]: b[best]["share_overhead"] for m, b in zip(models, by_name, strict=True)},
            "share_target": SHARE_TARGET, "share_target_met": share <= SHARE_TARGET,
            "overhead_target_met": max(b[best]["share_overhead"] for b in by_name) <= SHARE_TARGET})
    return result


def one_axis(candidate: dict[str, Any]) -> bool:
    """The full probe, or a candidate that differs from it in one choice only."""
    keys = ("blocks", "heads", "rows", "steps")
    full = asdict(FULL_PROBE)
    return sum(candidate[k] != full[k] for k in keys) <= 1


def report(summary: dict[str, Any]) -> str:
    rec = summary["recommendation"]
    lines = [f"machine: {describe_machine(summary['machine'])}", ""]
    headers = ["setting", "units", "dE rho", "split", "split/iter", "peak J", "|E err|", "fwd x", "pass/rollout",
               "share", "share +ref", "overhead", "ok"]
    for m in summary["models"]:
        info, t = m["model"], m["timing"]
        lines.append(f"{m['label']}: {info['blocks']} blocks x {info['heads']} heads, {info['image_tokens']} image "
                     f"tokens, T = {info['steps']}, peaks: top-{info['peaks']} of the first {info['peak_steps']} "
                     f"steps; {len(m['prompts'])} prompts; trained {m['training']['iterations']} iterations "
                     f"(full-probe dE: mean {statistics.fmean(m['full_dE']):.3g}, "
                     f"min {min(m['full_dE']):.3g}, max {max(m['full_dE']):.3g})")
        lines.append(f"unprobed forward (batch {info['probe_batch']}) {t['forward_s'] * 1e3:.1f} ms; the recipe's "
                     f"rollout {t['rollout_s']:.3f} s ({'the trainer' if t['rollout_measured_by_trainer'] else 'est.'}"
                     f"; {info['rollout_samples']} samples x {info['steps']} independent steps in batches of "
                     f"{info['rollout_batch']} would take {t['rollout_estimate_s']:.3f} s); the unprobed T-step "
                     f"anchor pass alone would take "
                     f"{_fmt(t['unprobed_pass_share'])} of pass + rollout; the trainer's own probe share while "
                     f"training (recipe probe, reference included where needed): "
                     f"{_fmt(m['training']['trainer_probe_share'])}; passing here: "
                     f"{sum(c['passes'] for c in m['candidates'])} of {len(m['candidates'])} candidates")
        shown = [c for c in m["candidates"] if one_axis(c)]
        cheapest = sorted((c for c in m["candidates"] if c["passes"] and not one_axis(c) and "share" in c),
                          key=lambda c: c["pass_vs_rollout"])[:6]
        near = sorted((c for c in m["candidates"] if not c["passes"] and not one_axis(c) and "share" in c),
                      key=margin, reverse=True)[:NEAR_MISSES]
        best = [c for c in m["candidates"] if c["name"] == rec["recommended"] and c not in shown + cheapest]
        seen: set[tuple[str, int]] = set()
        unique = []
        for c in shown + best + cheapest + near:  # rows=64 is rows=all on a 64-token image: shown once
            key = (json.dumps(c["probe"], sort_keys=True), c["pass_steps"])
            if key not in seen:
                seen.add(key)
                unique.append(c)
        rows = [[c["name"], c["units"], c["dE_spearman"], c["split_agreement"], c["split_agreement_per_iteration"],
                 c["peak_jaccard"], c["E_abs_error"], c.get("forward_cost"), c.get("pass_vs_rollout"), c.get("share"),
                 c.get("share_with_reference"), c.get("share_overhead"), "yes" if c["passes"] else "no"]
                for c in unique]
        lines += [table(headers, rows), ""]
    if rec["recommended"] is None:
        lines.append("recommendation: no candidate passes (dE rho >= 0.9, split >= 90%, peak Jaccard >= 0.8) "
                     "in every model")
    else:
        shares = ", ".join(f"{k} {v:.1%}" for k, v in rec["share"].items())
        with_ref = ", ".join(f"{k} {v:.1%}" for k, v in rec["share_with_reference"].items())
        overhead = ", ".join(f"{k} {v:.1%}" for k, v in rec["share_overhead"].items())
        lines.append(f"recommendation: {rec['recommended']} (cheapest of {len(rec['passing'])} passing "
                     f"candidates); probe share with E_ref cached: {shares}; with the reference too: {with_ref}; "
                     f"probe overhead alone (anchor reused by the rollout): {overhead}; "
                     f"target <= {SHARE_TARGET:.0%}: {'met' if rec['share_target_met'] else 'missed'} "
                     f"(overhead alone: {'met' if rec['overhead_target_met'] else 'missed'})")
    if "near_miss" in rec:
        near = rec["near_miss"]
        parts = "; ".join(f"{m['label']}: dE rho {near[m['label']]['dE_spearman']:.3f}, split "
                          f"{near[m['label']]['split_agreement']:.3f}, peak J {near[m['label']]['peak_jaccard']:.3f}"
                          for m in summary["models"])
        lines.append(f"nearest miss among the cheaper candidates: {near['name']} ({parts})")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """E(t) of a few prompts under the policy, full probe (solid; the reference dotted) against the recommended
    probe (dashed), or, when that is the full probe itself or there is none, against the model's full-T
    candidate nearest to passing."""
    chosen = summary["recommendation"]["recommended"]
    models = summary["models"]
    fig, axes = figure(panels=len(models))
    for ax, m in zip(axes, models, strict=True):
        steps = range(m["model"]["steps"])
        cheap_name = m["closest"]
        if chosen is not None and not chosen.startswith(FULL_PROBE.name.removesuffix("steps=T")):
            cheap_name = chosen.replace("steps=T/2", "steps=T")
        full, cheap = m["curves"][FULL_PROBE.name], m["curves"][cheap_name]
        shown = len(m["prompts"])
        for colour, j in enumerate(sorted({k * shown // SHOWN_PROMPTS for k in range(min(SHOWN_PROMPTS, shown))})):
            ax.plot(steps, full["theta"][j], "-", color=f"C{colour}", lw=1.5, label=m["prompts"][j])
            ax.plot(steps, full["reference"][j], ":", color=f"C{colour}", lw=1)
            ax.plot(steps, cheap["theta"][j], "--", color=f"C{colour}", lw=1.2)
        ax.set_xlabel("step t")
        ax.set_ylabel("attention entropy E(t)")
        ax.set_title(f"{m['label']}: full probe (solid; reference dotted),\n{cheap_name} (dashed)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(quick: bool = False, out: Path = Path("runs/bench/probe")) -> int:
    """Run the benchmark (module docstring); write summary.json and entropy_curves.png under `out`; print
    the table."""
    settings = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models = []
    config = recipe("aegpo")
    with tempfile.TemporaryDirectory(prefix="egrpo-probe-bench-") as tmp:
        worlds = [("toy", [], settings.iterations)]
        if settings.tiny:
            tiny = build_tiny(Path(tmp) / "tiny-flux")
            worlds.append(("tiny-flux", [f"model.path={tiny}", *TINY_OVERRIDES], settings.tiny_iterations))
        for name, overrides, snapshots in worlds:
            trainer = make_trainer(config, overrides, Path(tmp) / "runs" / name)
            try:
                done = 0
                for stop in snapshots:  # one training run, measured at each snapshot
                    training = train(trainer, done, stop, overrides)
                    done = stop
                    label = name if len(snapshots) == 1 else f"{name}@{stop}"
                    models.append(measure_model(label, trainer, training, settings))
            finally:
                trainer.close()
    summary: dict[str, Any] = {"machine": machine(), "settings": asdict(settings), "recipe": str(config),
                               "models": models}
    summary["recommendation"] = recommend(models)
    summary["figures"] = {"entropy_curves": str(plot(summary, out / "entropy_curves.png"))}
    summary["wall_seconds"] = time.perf_counter() - start
    path = write_summary(out, summary)
    print(report(summary))
    print(f"\nwrote {path} and {summary['figures']['entropy_curves']} in {summary['wall_seconds']:.0f} s")
    return 0
