"""Ray actors for rollouts, rewards and scheduling: thin shells around the plain objects.

RolloutWorker and RewardServer calls are idempotent (a rollout is a pure function of its plans and the
weights it is handed), so both restart after a crash and Ray retries the call that was in flight.
Weights travel with every rollout call as a reference (wrapped in a list, so Ray does not fetch it): a
worker loads them only when their version differs from the one it holds, which also covers a worker
that restarted with its initial weights.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from egrpo.batch import Batch
from egrpo.config import Config
from egrpo.sampling.plans import SamplePlan
from egrpo.sampling.rollout import RolloutResult, run_plan
from egrpo.scheduler import Scheduler


def _set_threads(cpus: float) -> None:
    """One torch thread per CPU the actor asked for: on a shared CPU node, more only fights the others."""
    torch.set_num_threads(max(1, int(cpus)))


def weights_checksum(state: dict[str, torch.Tensor]) -> float:
    """An order-independent float64 checksum of a state dict, to compare sender and receiver."""
    return float(sum(v.double().sum() * (i + 1) for i, (_, v) in enumerate(sorted(state.items()))))


@dataclass
class RolloutShard:
    sample_ids: list[int]
    result: RolloutResult
    weights_version: int
    worker: str
    seconds: float


@ray.remote(max_restarts=-1, max_task_retries=-1)
class RolloutWorker:
    def __init__(self, cfg: Config, cpus: float) -> None:
        from egrpo.trainer import load_policy, sampler_settings

        _set_threads(cpus)
        self.policy = load_policy(cfg)
        self.settings = sampler_settings(cfg)
        self.version = -1  # initial weights; version 0 is the learners' first broadcast

    def sync(self, weights: list, version: int) -> None:
        """Load weights `version` (a reference in a list, fetched only when the version is new)."""
        if version != self.version:
            self.policy.load_trainable_state_dict(ray.get(weights[0]))
            self.version = version

    def rollout(self, plans: list[SamplePlan], sample_ids: list[int], weights: list, version: int) -> RolloutShard:
        self.sync(weights, version)
        start = time.perf_counter()
        result = run_plan(self.policy, plans, self.settings)
        return RolloutShard(sample_ids, result, self.version, ray.get_runtime_context().get_actor_id(),
                            time.perf_counter() - start)

    def weights_checksum(self) -> float:
        return weights_checksum(self.policy.trainable_state_dict())

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote(max_restarts=-1, max_task_retries=-1)
class RewardServer:
    def __init__(self, reward_names: list[str], cpus: float) -> None:
        from egrpo.rewards.base import build_reward_models

        _set_threads(cpus)
        self.models = build_reward_models(reward_names)

    def score(self, samples: Batch) -> dict[str, torch.Tensor]:
        from egrpo.rewards.base import score_all

        return score_all(self.models, samples["images"], samples["prompt"])


@ray.remote(num_cpus=0)
class BudgetScheduler:
    """Owns the prompt sampler, the iteration's plan and its accounting; also publishes run metrics to the
    Ray dashboard (ray.util.metrics), since it lives for the whole run."""

    def __init__(self, cfg: Config) -> None:
        from ray.util import metrics

        self.scheduler = Scheduler(cfg)
        self.gauges: dict[str, Any] = {}
        self._metrics = metrics

    def plan(self, iteration: int) -> list[SamplePlan]:
        return self.scheduler.plan(iteration)

    def receive(self, sample_ids: list[int]) -> None:
        self.scheduler.receive(sample_ids)

    def check_complete(self) -> dict[str, int]:
        return self.scheduler.check_complete()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)

    def publish(self, record: dict[str, Any]) -> None:
        """Set one `egrpo_*` gauge per numeric metric (shown in the dashboard's metrics view)."""
        for key, value in record.items():
            if not isinstance(value, (int, float)):
                continue
            name = "egrpo_" + "".join(c if c.isalnum() else "_" for c in key)
            if name not in self.gauges:
                self.gauges[name] = self._metrics.Gauge(name, description=f"egrpo {key}")
            self.gauges[name].set(float(value))
