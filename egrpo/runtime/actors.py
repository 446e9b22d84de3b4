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
from egrpo.methods import plan_method
from egrpo.runtime.weight_sync import GroupAddress, StaleWeightsError, broadcast_state, join, weights_checksum
from egrpo.sampling.plans import SamplePlan
from egrpo.sampling.rollout import ProbeRequest, ProbeResult, RolloutResult, probe_entropies, run_plan
from egrpo.scheduler import Scheduler


def _set_threads(cpus: float) -> None:
    """One torch thread per CPU the actor asked for: on a shared CPU node, more only fights the others."""
    torch.set_num_threads(max(1, int(cpus)))


@dataclass
class RolloutShard:
    """What the driver receives of one worker's rollout: everything but the pixels and the latents, which stay
    in the object store (the rollout call's other two returns) until a reward server or a learner reads them."""

    sample_ids: list[int]
    result: RolloutResult  # samples without images; trained steps without x_in / x_out
    weights_version: int
    worker: str
    seconds: float
    embeddings: dict[str, dict[str, torch.Tensor]]  # its prompts' conditioning, for learners without encoders


LATENT_COLUMNS = ("x_in", "x_out")  # the trained steps' large columns, sent to the learners by reference


def split_for_transport(shard: RolloutShard) -> tuple[RolloutShard, Batch, Batch]:
    """(summary, images, latents) of a shard: the summary without the images and the trained steps' latents; the
    images with what scoring needs (image_finite, prompt); the latents in the trained steps' order."""
    samples, steps = shard.result.samples, shard.result.train_steps
    images = Batch({k: samples[k] for k in ("images", "image_finite")}, {"prompt": samples["prompt"]})
    summary_samples = Batch({k: v for k, v in samples.tensors.items() if k != "images"}, samples.meta)
    latents = Batch({k: steps[k] for k in LATENT_COLUMNS if k in steps.tensors})
    summary_steps = Batch({k: v for k, v in steps.tensors.items() if k not in LATENT_COLUMNS}, steps.meta)
    summary = RolloutShard(shard.sample_ids, RolloutResult(summary_samples, summary_steps,
                                                           shard.result.transformer_calls),
                           shard.weights_version, shard.worker, shard.seconds, shard.embeddings)
    return summary, images, latents


@ray.remote(max_restarts=-1, max_task_retries=-1)
class RolloutWorker:
    def __init__(self, cfg: Config, cpus: float) -> None:
        from egrpo.trainer import load_policy, probe_settings, sampler_settings

        _set_threads(cpus)
        # the reference policy for E_ref, when the method probes; KL is the learners'
        self.policy = load_policy(cfg, keep_reference=plan_method(cfg).needs_probes)
        self.settings = sampler_settings(cfg, self.policy.device)
        self.probe_settings, self.probe_steps = probe_settings(cfg), cfg.aegpo_peak_steps
        self.version = -1  # initial weights; version 0 is the learners' first broadcast
        self.bucket_bytes = int(cfg.runtime.sync_bucket_mb * 2**20)
        self.broadcast = cfg.broadcast_weights
        self.group, self.generation = None, -1  # full-weight broadcast group (egrpo.runtime.weight_sync)

    def sync(self, weights: list, version: int) -> None:
        """Load weights `version` (a reference in a list, fetched only when the version is new). Under
        broadcast sync the reference is None and the weights must already be here."""
        if version == self.version:
            return
        if weights[0] is None:
            raise StaleWeightsError(f"holds weights version {self.version}, asked for {version}")
        self.policy.load_trainable_state_dict(ray.get(weights[0]))
        self.version = version

    def join_weight_group(self, address: GroupAddress, rank: int) -> None:
        old, self.group = self.group, join(address, rank)
        self.generation = address.generation
        if old is not None and address.backend == "nccl":  # free the previous generation's communicator
            old.abort()

    def weight_group_generation(self) -> int:
        """-1 after a restart: the driver then re-forms the group."""
        return self.generation

    def receive_weights(self, version: int) -> None:
        """Collective with the learners' `publish_weights`: receive the full weights into the live parameters,
        stamped `version`."""
        broadcast_state(self.group, self._broadcast_tensors(), self.bucket_bytes, self.policy.device)
        self.version = version

    def _broadcast_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.policy.named_trainable_parameters().items()}

    @ray.method(num_returns=3)
    def rollout(self, plans: list[SamplePlan], sample_ids: list[int], weights: list, version: int,
                with_embeddings: bool = False, anchors: list | None = None) -> tuple[RolloutShard, Batch, Batch]:
        """Run `plans` with weights `version`; returns three objects (`split_for_transport`): the summary the
        driver reads, the uint8 images for a reward server, the trained steps' latents for the learners.
        `with_embeddings`: the summary also brings the prompts' conditioning (for learners without encoders).
        `anchors`: references to probes' anchor latents (`probe`), used where they were made with these weights."""
        self.sync(weights, version)
        start = time.perf_counter()
        known = {}
        for made_with, trajectories in ray.get(anchors or []):
            if made_with == self.version:
                known.update(trajectories)
        result = run_plan(self.policy, plans, self.settings, known)
        embeddings = self.policy.prompt_embeddings([p.prompt for p in plans]) if with_embeddings else {}
        return split_for_transport(RolloutShard(sample_ids, result, self.version,
                                                ray.get_runtime_context().get_actor_id(),
                                                time.perf_counter() - start, embeddings))

    @ray.method(num_returns=2)
    def probe(self, requests: list[ProbeRequest], weights: list, version: int) -> tuple[ProbeResult, tuple]:
        """AEGPO's anchor pass with attention-entropy probes (egrpo.sampling.rollout.probe_entropies): the
        entropies for the scheduler, and (weights version, anchor latents) for the rollouts to reuse."""
        self.sync(weights, version)
        probes, anchors = probe_entropies(self.policy, requests, self.settings, self.probe_settings,
                                          self.probe_steps)
        return probes, (self.version, anchors)

    def weights_checksum(self) -> float:
        """The checksum of the weights held, under the names the sync sends them by, computed on the device."""
        return weights_checksum(self._broadcast_tensors() if self.broadcast else self.policy.trainable_tensors())

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote(max_restarts=-1, max_task_retries=-1)
class RewardServer:
    def __init__(self, cfg: Config, cpus: float) -> None:
        from egrpo.trainer import load_reward_models

        _set_threads(cpus)
        self.models = load_reward_models(cfg)

    def score(self, samples: Batch) -> dict[str, torch.Tensor]:
        """Every reward of `samples` (a rollout's images, handed over by reference from the rollout worker);
        NaN for an image that did not decode finite."""
        from egrpo.rewards.base import score_samples

        return score_samples(self.models, samples)


@ray.remote(num_cpus=0)
class BudgetScheduler:
    """Owns the prompt sampler, the iteration's plan and its accounting; also publishes run metrics to the
    Ray dashboard (ray.util.metrics), since it lives for the whole run."""

    def __init__(self, cfg: Config) -> None:
        from ray.util import metrics

        self.scheduler = Scheduler(cfg)
        self.gauges: dict[str, Any] = {}
        self._metrics = metrics

    def draw(self, iteration: int) -> list[ProbeRequest]:
        return self.scheduler.draw(iteration)

    def plan(self, iteration: int, probes: ProbeResult | None) -> list[SamplePlan]:
        return self.scheduler.plan(iteration, probes)

    def receive(self, sample_ids: list[int]) -> None:
        self.scheduler.receive(sample_ids)

    def check_complete(self) -> dict[str, float]:
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
