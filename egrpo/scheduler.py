"""The budget scheduler's logic as a plain object: prompts, iteration plans, work splitting and accounting.

The Ray `BudgetScheduler` actor is a thin shell around `Scheduler`. Allocation of rollouts to prompts is
uniform for now (every prompt gets `plan.group_size` per group); AEGPO's dE policies plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from egrpo.config import Config
from egrpo.data.prompts import PromptSampler, load_prompts
from egrpo.sampling.plans import SamplePlan, build_plan


def plan_work(plan: SamplePlan) -> int:
    """Transformer calls a sample costs after it leaves the shared anchor."""
    return len(plan.steps)


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
        self.prompt_stats: dict[str, dict[str, Any]] = {}
        self.accounting = Accounting()

    def plan(self, iteration: int) -> list[SamplePlan]:
        prompts = self.sampler.next(self.cfg.plan.prompts_per_iteration)
        for p in prompts:
            self.prompt_stats.setdefault(p, {"times_drawn": 0})["times_drawn"] += 1
        plans = build_plan(self.cfg, prompts, iteration)
        self.accounting = Accounting()
        self.accounting.request(list(range(len(plans))))
        return plans

    def receive(self, sample_ids: list[int]) -> None:
        self.accounting.receive(sample_ids)

    def check_complete(self) -> dict[str, int]:
        """Raise if a sample was lost or counted twice; else the iteration's accounting as metrics."""
        a = self.accounting
        if a.missing or a.duplicates:
            raise RuntimeError(f"sample accounting failed: missing {sorted(a.missing)}, {a.duplicates} duplicates")
        return {"samples/requested": len(a.requested), "samples/received": len(a.received)}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "prompt_stats": self.prompt_stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.prompt_stats = state["prompt_stats"]
