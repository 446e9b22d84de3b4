"""Rollout plans: which steps of which sample explore (SDE), which are trained, and who shares a group.

A plan is data (ALGORITHMS.md section 3). Each `SamplePlan` starts from the latent of its prompt's shared ODE
*anchor* trajectory at schedule index `branch_from` (index 0 is the initial noise itself), then follows its
`steps`. Every method is expressed this way:

- `grpo`  every step SDE from the noise, the loss on a random fraction of steps; group = prompt.
- `mix`   ODE up to a sliding window (taken from the anchor), SDE inside it, ODE after; group = prompt.
- `egrpo` for each active step n, G branches leave the anchor at n, take ONE SDE step merged over l_n steps,
          then ODE to the end; group = (prompt, n).
- `aegpo` SDE at the top-k peaks of the prompt's attention entropy E(t) along its anchor, ODE elsewhere (the
          first ODE stretch is the anchor's); group = prompt, of size G_i from the prompt's dE
          (egrpo.algo.budgets). Each SDE step is one step long unless `aegpo.merge` asks for E-GRPO's merge
          lengths.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from egrpo.config import Config
from egrpo.sampling.steps import NoiseSpec, sigma_schedule, step_entropy


@dataclass(frozen=True)
class Step:
    """One integration step from schedule index `start` to `start + length`."""

    start: int
    length: int
    sde: bool
    train: bool


@dataclass(frozen=True)
class SamplePlan:
    prompt: str
    seed: int  # initial-noise seed, shared by every sample of the prompt in this iteration
    noise_seed: int  # seed of this sample's SDE noise
    group: int  # advantages are normalised within a group
    branch_from: int  # anchor index the sample starts from (0 = the initial noise)
    steps: tuple[Step, ...]

    @property
    def explore_steps(self) -> tuple[int, ...]:
        return tuple(s.start for s in self.steps if s.sde)

    @property
    def merge_lengths(self) -> tuple[int, ...]:
        return tuple(s.length for s in self.steps if s.sde)


def merge_lengths(sigmas: torch.Tensor, noise: NoiseSpec, tau: float, active_steps: int) -> list[int]:
    """E-GRPO: for each active step n, the smallest l >= 1 with exp(h(n, l)) >= tau, capped at the steps left.

    h grows with l (g is fixed at the start point, |delta| grows), so the first l that reaches tau is minimal."""
    total = len(sigmas) - 1
    lengths = []
    for n in range(active_steps):
        length = 1
        while math.exp(step_entropy(noise, sigmas, n, length)) < tau and n + length < total:
            length += 1
        lengths.append(length)
    return lengths


def mix_window_start(start: int, window: int, move_every: int, steps: int, iteration: int) -> int:
    """MixGRPO window: starts at `start`, moves by one every `move_every` iterations, and wraps back to
    `start` after reaching the last step (our choice; the paper's schedule is silent on the end)."""
    positions = steps - window - start + 1
    return start + (iteration // move_every) % positions


def _ode_tail(start: int, total: int) -> tuple[Step, ...]:
    return tuple(Step(i, 1, sde=False, train=False) for i in range(start, total))


def grpo_plan(prompts, seeds, group_size, steps, train_fraction, rng: random.Random) -> list[SamplePlan]:
    trained_per_sample = max(1, round(train_fraction * steps))
    plans = []
    for p, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        for _ in range(group_size):
            trained = set(rng.sample(range(steps), trained_per_sample))
            path = tuple(Step(i, 1, sde=True, train=i in trained) for i in range(steps))
            plans.append(SamplePlan(prompt, seed, rng.getrandbits(31), p, 0, path))
    return plans


def mix_plan(prompts, seeds, group_size, steps, window_start, window, rng: random.Random) -> list[SamplePlan]:
    plans = []
    window_steps = tuple(Step(i, 1, sde=True, train=True) for i in range(window_start, window_start + window))
    path = window_steps + _ode_tail(window_start + window, steps)
    for p, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        for _ in range(group_size):
            plans.append(SamplePlan(prompt, seed, rng.getrandbits(31), p, window_start, path))
    return plans


def egrpo_plan(prompts, seeds, group_size, steps, lengths: list[int], rng: random.Random) -> list[SamplePlan]:
    plans = []
    for p, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        for n, length in enumerate(lengths):
            path = (Step(n, length, sde=True, train=True),) + _ode_tail(n + length, steps)
            group = p * len(lengths) + n
            for _ in range(group_size):
                plans.append(SamplePlan(prompt, seed, rng.getrandbits(31), group, n, path))
    return plans


def entropy_peaks(curve: Sequence[float], k: int) -> list[int]:
    """The steps of the top-k local maxima of an entropy curve E(t), in step order (ALGORITHMS.md section 3).

    A local maximum is a run of equal values (one point, or a plateau, represented by its first step) that is
    higher than the values on both sides; a run at an edge needs only its one neighbour to be lower, and a
    constant curve is one run. Fewer than k maxima gives fewer steps; ties in height go to the earlier step."""
    runs: list[tuple[int, int]] = []  # (first, last) step of each run of equal values
    for t, value in enumerate(curve):
        if runs and value == curve[runs[-1][0]]:
            runs[-1] = (runs[-1][0], t)
        else:
            runs.append((t, t))
    peaks = []
    for r, (first, last) in enumerate(runs):
        left_lower = r == 0 or curve[runs[r - 1][0]] < curve[first]
        right_lower = r == len(runs) - 1 or curve[runs[r + 1][0]] < curve[last]
        if left_lower and right_lower:
            peaks.append(first)
    peaks.sort(key=lambda t: (-curve[t], t))
    return sorted(peaks[:k])


def aegpo_plan(
    prompts, seeds, group_sizes: list[int], peaks: list[list[int]], lengths: list[int], steps: int,
    rng: random.Random,
) -> list[SamplePlan]:
    """Prompt i gets group_sizes[i] samples (one group) that follow its anchor to its first peak, then take an
    SDE step of lengths[n] at each peak n and ODE steps elsewhere; the loss is taken on the SDE steps. A peak
    that a merged step before it already covers is skipped."""
    plans = []
    for group, (prompt, seed, size, prompt_peaks) in enumerate(zip(prompts, seeds, group_sizes, peaks, strict=True)):
        path, i = [], prompt_peaks[0]
        while i < steps:
            length = lengths[i] if i in prompt_peaks else 1
            path.append(Step(i, length, sde=i in prompt_peaks, train=i in prompt_peaks))
            i += length
        plans += [SamplePlan(prompt, seed, rng.getrandbits(31), group, prompt_peaks[0], tuple(path))
                  for _ in range(size)]
    return plans


def ode_plan(prompts: list[str], seeds: list[int], steps: int) -> list[SamplePlan]:
    """Deterministic samples (every step ODE), one per (prompt, seed): what evaluation and `egrpo sample` draw."""
    path = _ode_tail(0, steps)
    return [SamplePlan(p, s, 0, k, 0, path) for k, (p, s) in enumerate(zip(prompts, seeds, strict=True))]


def noise_spec(cfg: Config) -> NoiseSpec:
    return NoiseSpec(cfg.sampler.noise, cfg.sampler.noise_level)


def egrpo_merge_lengths(cfg: Config) -> list[int]:
    sigmas = sigma_schedule(cfg.sampler.steps, cfg.sampler.shift)
    return merge_lengths(sigmas, noise_spec(cfg), cfg.egrpo.tau, cfg.egrpo_active_steps)


def aegpo_merge_lengths(cfg: Config) -> list[int]:
    """Length of the SDE step at each step of the schedule: E-GRPO's merge lengths with `aegpo.merge`, else 1."""
    if not cfg.aegpo.merge:
        return [1] * cfg.sampler.steps
    sigmas = sigma_schedule(cfg.sampler.steps, cfg.sampler.shift)
    return merge_lengths(sigmas, noise_spec(cfg), cfg.egrpo.tau, cfg.sampler.steps)


def prompt_seed(run_seed: int, prompt: str) -> int:
    """AEGPO's initial-noise seed of a prompt, the same at every iteration: dE then compares like with like
    across iterations, and the reference entropy E_ref of a (prompt, seed) is computed once."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}/{prompt}".encode()).digest()[:4], "big") >> 1


def build_plan(
    cfg: Config, prompts: list[str], iteration: int,
    group_sizes: list[int] | None = None, peaks: list[list[int]] | None = None,
) -> list[SamplePlan]:
    """The iteration's plan for the configured method; deterministic in (run.seed, iteration, prompts).
    `aegpo` also needs each prompt's group size and peak steps (from the scheduler's entropy probes)."""
    rng = random.Random(f"{cfg.run.seed}/{iteration}")
    if cfg.plan.method == "aegpo":
        if group_sizes is None or peaks is None:
            raise ValueError("an aegpo plan needs group sizes and peaks from the entropy probes")
        seeds = [prompt_seed(cfg.run.seed, p) for p in prompts]
        return aegpo_plan(prompts, seeds, group_sizes, peaks, aegpo_merge_lengths(cfg), cfg.sampler.steps, rng)
    seeds = [rng.getrandbits(31) for _ in prompts]
    T, G = cfg.sampler.steps, cfg.plan.group_size
    method = cfg.plan.method
    if method == "grpo":
        return grpo_plan(prompts, seeds, G, T, cfg.grpo.train_fraction, rng)
    if method == "mix":
        start = mix_window_start(cfg.mix.start, cfg.mix.window, cfg.mix.move_every, T, iteration)
        return mix_plan(prompts, seeds, G, T, start, cfg.mix.window, rng)
    if method == "egrpo":
        return egrpo_plan(prompts, seeds, G, T, egrpo_merge_lengths(cfg), rng)
    raise ValueError(f"unknown plan method {method!r}")


def describe_schedule(cfg: Config) -> dict:
    """What `egrpo plan` prints: per step sigma and one-step entropy; the active steps and their merge lengths."""
    sigmas = sigma_schedule(cfg.sampler.steps, cfg.sampler.shift)
    noise = noise_spec(cfg)
    active = list(range(cfg.egrpo_active_steps))
    return {
        "sigmas": [float(s) for s in sigmas],
        "step_entropy": [step_entropy(noise, sigmas, i, 1) for i in range(cfg.sampler.steps)],
        "active_steps": active,
        "merge_lengths": egrpo_merge_lengths(cfg),
        "tau": cfg.egrpo.tau,
    }
