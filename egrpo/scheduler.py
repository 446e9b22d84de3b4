"""The budget scheduler's logic as a plain object: prompts, iteration plans, work splitting and accounting.

The Ray `BudgetScheduler` actor is a thin shell around `Scheduler`. An iteration starts with `draw`, which
picks the prompts and says which anchors to probe (AEGPO only); `plan` then turns the probe results into
the iteration's plan. For `aegpo` that is where both entropy signals act (ALGORITHMS.md section 3): dE per
prompt against the cached reference entropy sets each prompt's group size (egrpo.algo.budgets), and the
peaks of E(t) set its exploration steps. Every other method gets `plan.group_size` per group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from egrpo.algo.budgets import allocate_rollouts, relative_entropy_change
from egrpo.config import Config
from egrpo.data.prompts import PromptSampler, load_prompts
from egrpo.methods import EntropyGuidance, build_plan, plan_method, tree_splits
from egrpo.sampling.plans import SamplePlan, entropy_peaks, prompt_seed, split_steps
from egrpo.sampling.rollout import ProbeRequest, ProbeResult


def plan_work(plan: SamplePlan) -> int:
    """Transformer calls a sample costs after it leaves the shared anchor (an upper bound for a tree's leaves,
    which share their ancestors' calls)."""
    return len(plan.steps)


@dataclass
class PromptRecord:
    """What the scheduler knows of one prompt: how often it was drawn and, under AEGPO, its dE at each draw
    and its last budget (rollouts, a tree's leaves) and exploration steps (peaks, a tree's split steps)."""

    times_drawn: int = 0
    dE: list[float] = field(default_factory=list)
    budget: int | None = None
    peaks: list[int] = field(default_factory=list)


def split_by_prompt(plans: list[SamplePlan], workers: int) -> list[list[int]]:
    """Indices of `plans` for each worker, balanced by work (greedy, largest first).

    Samples that share a (prompt, seed) stay together: they share one anchor trajectory and every advantage
    group, so a worker can compute both without talking to the others."""
    units: dict[tuple[str, int], list[int]] = {}
    for k, p in enumerate(plans):
        units.setdefault((p.prompt, p.seed), []).append(k)
    loads = [0] * workers
    shards: list[list[int]] = [[] for _ in range(workers)]
    for key in sorted(units, key=lambda key: -sum(plan_work(plans[k]) for k in units[key])):
        target = loads.index(min(loads))
        shards[target].extend(units[key])
        loads[target] += sum(plan_work(plans[k]) for k in units[key])
    return [sorted(s) for s in shards]


@dataclass
class Accounting:
    """Every sample asked for is received exactly once, also across a worker restart and a retried shard."""

    requested: set[int] = field(default_factory=set)
    received: set[int] = field(default_factory=set)
    duplicates: int = 0

    def request(self, ids: list[int]) -> None:
        self.requested.update(ids)

    def receive(self, ids: list[int]) -> None:
        for i in ids:
            if i in self.received:
                self.duplicates += 1
            self.received.add(i)

    @property
    def missing(self) -> set[int]:
        return self.requested - self.received


class Scheduler:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sampler = PromptSampler(load_prompts(cfg.data.prompts), cfg.run.seed)
        self.records: dict[str, PromptRecord] = {}
        # prompt -> E_ref(t). E_ref is fixed per (prompt, seed), and AEGPO's seed is a function of the prompt
        # within a run (plans.prompt_seed), so the prompt is the key.
        self.reference_entropy: dict[str, list[float]] = {}
        self.accounting = Accounting()
        self.prompts: list[str] = []
        self.plan_metrics: dict[str, float] = {}

    def draw(self, iteration: int) -> list[ProbeRequest]:
        """Pick the iteration's prompts; return the anchors to probe (none unless the method is aegpo)."""
        self.prompts = self.sampler.next(self.cfg.plan.prompts_per_iteration)
        for p in self.prompts:
            self.records.setdefault(p, PromptRecord()).times_drawn += 1
        if not plan_method(self.cfg).needs_probes:
            return []
        return [ProbeRequest(p, prompt_seed(self.cfg.run.seed, p), p not in self.reference_entropy)
                for p in self.prompts]

    def plan(self, iteration: int, probes: ProbeResult | None = None) -> list[SamplePlan]:
        """The plan of the prompts `draw` picked; `probes` answers `draw`'s requests, in order."""
        guidance = None
        if plan_method(self.cfg).needs_probes:
            if probes is None:
                raise ValueError(f"a {self.cfg.plan.method} iteration needs the probe results of draw()'s requests")
            guidance = self._entropy_guided(probes)
        plans = build_plan(self.cfg, self.prompts, iteration, guidance)
        self.accounting = Accounting()
        self.accounting.request(list(range(len(plans))))
        return plans

    def _entropy_guided(self, probes: ProbeResult) -> EntropyGuidance:
        """Budget per prompt from dE (global signal), exploration steps from E(t) (local): its top-k peaks, or
        for a tree as many split steps as its budget's leaves need (round(log_factor budget))."""
        a, p = self.cfg.aegpo, self.cfg.plan
        for prompt, row in zip(self.prompts, probes.reference, strict=True):
            if not torch.isnan(row).any():
                self.reference_entropy[prompt] = row.tolist()
        reference = torch.tensor([self.reference_entropy[prompt] for prompt in self.prompts])
        delta = relative_entropy_change(probes.entropy, reference)
        sizes = allocate_rollouts(delta.tolist(), p.prompts_per_iteration * p.group_size, a.budget,
                                  a.g_min, a.g_max, a.g_high, a.g_low, a.alpha)
        curves = [row.tolist() for row in probes.entropy]  # the probe ran the peak-seeking steps only
        if self.cfg.tree_plan:
            steps = [split_steps(curve, tree_splits(self.cfg, size)) for curve, size in zip(curves, sizes, strict=True)]
            sizes = [self.cfg.tree.factor ** len(points) for points in steps]
        else:
            steps = [entropy_peaks(curve, a.peaks) for curve in curves]
        for prompt, d, size, points in zip(self.prompts, delta.tolist(), sizes, steps, strict=True):
            record = self.records[prompt]
            record.dE.append(d)
            record.budget, record.peaks = size, points
        self.plan_metrics = {
            "entropy/mean": float(probes.entropy.mean()), "entropy/dE_mean": float(delta.mean()),
            "entropy/dE_min": float(delta.min()), "entropy/dE_max": float(delta.max()),
            "budget/min": min(sizes), "budget/max": max(sizes), "explore/peaks": sum(map(len, steps)) / len(steps),
        }
        for step in range(self.cfg.sampler.steps):  # histogram of chosen exploration steps
            self.plan_metrics[f"explore/step_{step}"] = sum(step in q for q in steps)
        return EntropyGuidance(sizes, steps)

    def receive(self, sample_ids: list[int]) -> None:
        self.accounting.receive(sample_ids)

    def check_complete(self) -> dict[str, float]:
        """Raise if a sample was lost or counted twice; else the iteration's accounting and plan metrics."""
        a = self.accounting
        if a.missing or a.duplicates:
            raise RuntimeError(f"sample accounting failed: missing {sorted(a.missing)}, {a.duplicates} duplicates")
        return {"samples/requested": len(a.requested), "samples/received": len(a.received), **self.plan_metrics}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(),
                "prompts": {prompt: asdict(record) for prompt, record in self.records.items()},
                "reference_entropy": self.reference_entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.records = {prompt: PromptRecord(**record) for prompt, record in state["prompts"].items()}
        self.reference_entropy = state["reference_entropy"]
