"""Rollout plans: which steps of which sample explore (SDE), which are trained, and who shares a group.

A plan is data (ALGORITHMS.md section 3). Each `SamplePlan` starts from the latent of its prompt's shared ODE
*anchor* trajectory at schedule index `branch_from` (index 0 is the initial noise itself), then follows its
`steps`. Each SDE step names the seed of its own noise, so two samples whose steps agree up to some index hold
the same latent there: that is how a tree is written down (its leaves share their ancestors' steps), and how
the rollout knows which samples can share a transformer call. Every method is expressed this way:

- `grpo`   every step SDE from the noise, the loss on a random fraction of steps; group = prompt.
- `mix`    ODE up to a sliding window (taken from the anchor), SDE inside it, ODE after; group = prompt.
- `egrpo`  for each active step n, G branches leave the anchor at n, take ONE SDE step merged over l_n steps,
           then ODE to the end; group = (prompt, n).
- `aegpo`  (independent) SDE at the top-k peaks of the prompt's attention entropy E(t) along its anchor, ODE
           elsewhere; group = prompt, of size G_i from the prompt's dE (egrpo.algo.budgets).
- trees    (`aegpo` with `aegpo.rollout: tree`, and `branch`, BranchGRPO): a prompt's samples are the leaves
           of a tree that leaves the anchor at its first split step and splits in `factor` children at each
           split step (AEGPO: its entropy peaks; branch: fixed steps); SDE at the splits, and between them too
           with `between: sde`; group = prompt, advantages per node (egrpo.algo.advantages.tree_advantages).

The functions here take plain arguments; `egrpo.methods` reads them from the config.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from egrpo.sampling.steps import NoiseSpec, step_entropy


@dataclass(frozen=True)
class Step:
    """One integration step from schedule index `start` to `start + length`."""

    start: int
    length: int
    sde: bool
    train: bool
    noise_seed: int | None = None  # seed of this step's SDE noise (None for ODE steps)


@dataclass(frozen=True)
class SamplePlan:
    prompt: str
    seed: int  # initial-noise seed, shared by every sample of the prompt in this iteration
    group: int  # advantages are normalised within a group
    branch_from: int  # anchor index the sample starts from (0 = the initial noise)
    steps: tuple[Step, ...]

    @property
    def explore_steps(self) -> tuple[int, ...]:
        return tuple(s.start for s in self.steps if s.sde)

    @property
    def merge_lengths(self) -> tuple[int, ...]:
        return tuple(s.length for s in self.steps if s.sde)

    @property
    def noise_seeds(self) -> tuple[int, ...]:
        return tuple(s.noise_seed for s in self.steps if s.sde)


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
            path = tuple(Step(i, 1, sde=True, train=i in trained, noise_seed=rng.getrandbits(31))
                         for i in range(steps))
            plans.append(SamplePlan(prompt, seed, p, 0, path))
    return plans


def mix_plan(prompts, seeds, group_size, steps, window_start, window, rng: random.Random) -> list[SamplePlan]:
    plans = []
    for p, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        for _ in range(group_size):
            window_steps = tuple(Step(i, 1, sde=True, train=True, noise_seed=rng.getrandbits(31))
                                 for i in range(window_start, window_start + window))
            path = window_steps + _ode_tail(window_start + window, steps)
            plans.append(SamplePlan(prompt, seed, p, window_start, path))
    return plans


def egrpo_plan(prompts, seeds, group_size, steps, lengths: list[int], rng: random.Random) -> list[SamplePlan]:
    plans = []
    for p, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        for n, length in enumerate(lengths):
            group = p * len(lengths) + n
            for _ in range(group_size):
                path = (Step(n, length, sde=True, train=True, noise_seed=rng.getrandbits(31)),)
                plans.append(SamplePlan(prompt, seed, group, n, path + _ode_tail(n + length, steps)))
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


def explore_walk(points: Sequence[int], lengths: Sequence[int], steps: int) -> list[tuple[int, int, bool]]:
    """(start, length, explores) of each step from the first point to the end: an SDE step of lengths[n] at
    each point n, one-step ODE steps elsewhere. A point that a merged step before it already covers is skipped."""
    walk, i = [], points[0]
    while i < steps:
        explores = i in points
        length = lengths[i] if explores else 1
        walk.append((i, length, explores))
        i += length
    return walk


def aegpo_plan(
    prompts, seeds, group_sizes: list[int], peaks: list[list[int]], lengths: list[int], steps: int,
    rng: random.Random,
) -> list[SamplePlan]:
    """AEGPO, independent reading: prompt i gets group_sizes[i] samples (one group) that follow its anchor to
    its first peak, then each take their own SDE step of lengths[n] at every peak n and ODE steps elsewhere;
    the loss is taken on the SDE steps."""
    plans = []
    for group, (prompt, seed, size, prompt_peaks) in enumerate(zip(prompts, seeds, group_sizes, peaks, strict=True)):
        walk = explore_walk(prompt_peaks, lengths, steps)
        for _ in range(size):
            path = tuple(Step(i, length, sde=explores, train=explores,
                              noise_seed=rng.getrandbits(31) if explores else None)
                         for i, length, explores in walk)
            plans.append(SamplePlan(prompt, seed, group, prompt_peaks[0], path))
    return plans


def split_steps(curve: Sequence[float], k: int) -> list[int]:
    """A tree's k split steps from an entropy curve: its top-k local maxima (`entropy_peaks`), filled up with
    the highest of its other steps when it has fewer maxima, so that the tree has the leaves its budget asks."""
    peaks = entropy_peaks(curve, k)
    others = sorted((t for t in range(len(curve)) if t not in peaks), key=lambda t: (-curve[t], t))
    return sorted(peaks + others[: k - len(peaks)])


def uniform_split_points(steps: int, splits: int) -> list[int]:
    """BranchGRPO's default split points: i * (T // R) for i < R (its parse_split_points)."""
    return sorted({i * (steps // splits) for i in range(splits)})


def tree_plan(
    prompts, seeds, splits: list[list[int]], lengths: list[int], steps: int, factor: int,
    between: Literal["ode", "sde"], rng: random.Random,
) -> list[SamplePlan]:
    """One tree per prompt (group = prompt): its leaves follow the prompt's anchor to its first split step,
    and at each split step n every node splits in `factor` children, each with its own SDE noise over
    lengths[n] steps (so a tree with s splits has factor^s leaves). Between splits each node takes ODE steps
    (`between="ode"`, TreeGRPO's reading) or SDE steps with its own noise (`"sde"`, BranchGRPO's). All SDE
    steps are trained. A leaf is one SamplePlan; leaves below one node share that node's steps and seeds."""
    plans = []
    for group, (prompt, seed, points) in enumerate(zip(prompts, seeds, splits, strict=True)):
        walk = explore_walk(points, lengths, steps)
        noise: dict[tuple[tuple[int, ...], int], int] = {}  # (node, step start) -> seed of that step's noise
        for leaf in itertools.product(range(factor), repeat=sum(explores for _, _, explores in walk)):
            path, depth = [], 0
            for i, length, is_split in walk:
                depth += is_split
                sde = is_split or between == "sde"
                node = leaf[:depth]  # the child a split step makes, or the node an in-between step moves
                if sde and (node, i) not in noise:
                    noise[node, i] = rng.getrandbits(31)
                path.append(Step(i, length, sde=sde, train=sde, noise_seed=noise[node, i] if sde else None))
            plans.append(SamplePlan(prompt, seed, group, points[0], tuple(path)))
    return plans


def ode_plan(prompts: list[str], seeds: list[int], steps: int) -> list[SamplePlan]:
    """Deterministic samples (every step ODE), one per (prompt, seed): what evaluation and `egrpo sample` draw."""
    path = _ode_tail(0, steps)
    return [SamplePlan(p, s, k, 0, path) for k, (p, s) in enumerate(zip(prompts, seeds, strict=True))]


def prompt_seed(run_seed: int, prompt: str) -> int:
    """AEGPO's initial-noise seed of a prompt, the same at every iteration: dE then compares like with like
    across iterations, and the reference entropy E_ref of a (prompt, seed) is computed once."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}/{prompt}".encode()).digest()[:4], "big") >> 1
