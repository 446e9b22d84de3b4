"""The distributed training loop: the driver places actors on Ray and moves object references between them.

One iteration (DESIGN.md): the BudgetScheduler plans; RolloutWorkers run their shards (split by prompt,
balanced by work) with the weights version the driver hands them; RewardServers score the images; the
driver normalises advantages per plan group (`score_rollout`, the same function as the in-process loop),
cuts minibatches and pre-slices them per learner rank; the DeepSpeed learners step; rank 0's new weights
become the next version. LoRA weights go into the object store and the rollout workers load them on their
next call; full weights are broadcast to them at once over torch.distributed (egrpo.runtime.weight_sync).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray
import torch
import yaml
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from egrpo.batch import Batch
from egrpo.checkpoint import checkpoint_to_resume, resolve_checkpoint
from egrpo.config import Config
from egrpo.learner import make_minibatches
from egrpo.runtime.actors import BudgetScheduler, RewardServer, RolloutShard, RolloutWorker
from egrpo.runtime.learner import LearnerActor, LearnerSettings, slice_for_ranks
from egrpo.runtime.weight_sync import BroadcastSync, ObjectStoreSync, StaleWeightsError
from egrpo.sampling.plans import SamplePlan
from egrpo.sampling.rollout import ProbeResult, RolloutResult
from egrpo.scheduler import split_by_prompt
from egrpo.trainer import (
    SHOWN_IMAGES,
    TrainingLoop,
    eval_metrics,
    held_out_plan,
    minibatch_seed,
    probe_metrics,
    score_rollout,
)

log = logging.getLogger("egrpo.runtime")

# What every actor's process needs: offline model loading, quiet telemetry. No DS_ACCELERATOR: each learner
# picks DeepSpeed's accelerator from its own device (the driver may run on a node without GPUs).
ACTOR_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "TRANSFORMERS_VERBOSITY": "error",
             "DIFFUSERS_VERBOSITY": "error"}


class ClusterError(RuntimeError):
    """The cluster cannot run this config (unreachable, too small, or an actor died for good)."""


def role_resources(cfg: Config, use_gpus: bool) -> dict[str, tuple[int, float, float]]:
    """role -> (actors, CPUs each, GPUs each)."""
    r = cfg.runtime
    return {
        "rollout": (r.rollout_workers, r.rollout_cpus, r.rollout_gpus if use_gpus else 0.0),
        "reward": (r.reward_servers, r.reward_cpus, r.reward_gpus if use_gpus else 0.0),
        "learner": (r.learners, r.learner_cpus, r.learner_gpus if use_gpus else 0.0),
    }


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when nothing listens at a Ray address: `ray.init` itself retries for minutes."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or hostport, int(port) if port.isdigit() else 6379), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {e}") from None


def connect(cfg: Config) -> None:
    """Join `runtime.address` / $RAY_ADDRESS, or start a local Ray that declares the CPUs the actors ask for."""
    if ray.is_initialized():
        return
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS", "")
    env = dict(ACTOR_ENV)
    if address:
        log.info("joining the Ray cluster at %s", address)
        probe_address(address)
        # Inside `ray job submit`, the job's runtime env (launch/runtime_env.yaml) and ours name the same
        # variables; Ray refuses that unless told to combine them.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError or its own types here
            raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {e}") from None
        return
    needed = sum(n * cpus for n, cpus, _ in role_resources(cfg, use_gpus=False).values())
    logical_cpus = max(os.cpu_count() or 1, math.ceil(needed))
    log.info("starting a local Ray with %d logical CPUs", logical_cpus)
    # address="local": a new Ray of our own, even when a `ray start` cluster runs on this machine
    context = ray.init(address="local", num_cpus=logical_cpus, include_dashboard=cfg.runtime.dashboard,
                       dashboard_host=cfg.runtime.dashboard_host, runtime_env={"env_vars": env}, log_to_driver=True)
    if cfg.runtime.dashboard:  # where Ray bound it: another port than 8265 when that one is taken
        log.info("Ray dashboard at http://%s", context.dashboard_url)


def check_resources(cfg: Config) -> bool:
    """Fail in seconds, naming what was asked and what the cluster has, when the actors cannot all fit.
    Returns whether GPUs are used (the cluster has any)."""
    have = ray.cluster_resources()
    use_gpus = have.get("GPU", 0) > 0
    roles = role_resources(cfg, use_gpus)
    need_cpu = sum(n * c for n, c, _ in roles.values())
    need_gpu = sum(n * g for n, _, g in roles.values())
    if need_cpu > have.get("CPU", 0) + 1e-9 or need_gpu > have.get("GPU", 0) + 1e-9:
        asked = ", ".join(f"{n} {role} x ({c} CPU, {g} GPU)" for role, (n, c, g) in roles.items())
        raise ClusterError(f"the config asks for {need_cpu:g} CPUs and {need_gpu:g} GPUs ({asked}); "
                           f"the cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs")
    return use_gpus


class ActorGroup:
    """N actors of one role in a placement group (PACK or SPREAD), named `<role>-<i>` for the dashboard."""

    def __init__(self, role: str, actor_class, count: int, cpus: float, gpus: float, strategy: str,
                 timeout_s: float, *args: Any, runtime_env: dict[str, Any] | None = None) -> None:
        self.role = role
        self.pg = placement_group([{"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}] * count,
                                  strategy=strategy, name=f"egrpo-{role}")
        if not self.pg.wait(timeout_seconds=min(timeout_s, 60)):
            remove_placement_group(self.pg)
            raise ClusterError(f"could not place {count} {role} actors ({cpus} CPU, {gpus} GPU each, {strategy}); "
                               f"cluster resources: {ray.cluster_resources()}")
        self.actors = [
            actor_class.options(
                name=f"{role}-{i}", num_cpus=cpus, num_gpus=gpus, runtime_env=runtime_env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(*args)
            for i in range(count)
        ]

    def __len__(self) -> int:
        return len(self.actors)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.pg)


def merge_shards(shards: list[RolloutShard], total: int) -> RolloutResult:
    """Put the workers' shard summaries back into plan order, with `sample` indices that refer to the whole
    plan. Each trained step also records where its latents are: `shard` (index into `shards`) and `row` there."""
    samples, steps, calls, states = [], [], 0, 0
    for index, shard in enumerate(shards):
        ids = shard.sample_ids
        s = shard.result.samples
        samples.append(Batch(s.tensors, {**s.meta, "plan": ids}))
        t = shard.result.train_steps
        if len(t):
            where = {"shard": torch.full((len(t),), index), "row": torch.arange(len(t))}
            # a shard's state ids count from 0: offset them so that states of different shards stay apart
            meta = {**t.meta, "sample": [ids[k] for k in t["sample"]],
                    "leaves": [[ids[k] for k in leaves] for leaves in t["leaves"]],
                    "input": [states + state for state in t["input"]]}
            steps.append(Batch({**t.tensors, **where}, meta))
            states += max(t["input"]) + 1
        calls += shard.result.transformer_calls
    merged = Batch.concat(samples)
    order = sorted(range(total), key=lambda k: merged["plan"][k])
    train_steps = Batch.concat(steps)
    step_order = sorted(range(len(train_steps)), key=lambda k: train_steps["sample"][k])  # stable: plan order
    return RolloutResult(merged.select(order), train_steps.select(step_order), calls)


@dataclass
class Pending:
    """A rollout-worker call in flight: the worker, how to make the call again (after a restart), its refs."""

    worker: int
    call: Callable[[Any], Any]
    refs: Any  # one ObjectRef, or a rollout's three (summary, images, latents)


@dataclass
class RolloutShardRefs:
    """A rollout shard as the driver holds it: the summary fetched, images and latents left in the object store."""

    summary: RolloutShard
    images: Any
    latents: Any


@dataclass
class PlannedIteration:
    """An iteration from its plan to its rollouts in flight (started early under `runtime.overlap`)."""

    iteration: int
    plans: list[SamplePlan]
    probes: ProbeResult | None
    times: dict[str, float]  # time/probe, time/schedule
    rollouts: list[Pending]


class RayTrainer(TrainingLoop):
    def __init__(self, cfg: Config, resume: str | None = None) -> None:
        self._setup_run(cfg)
        connect(cfg)
        use_gpus = self.use_gpus = check_resources(cfg)
        r, timeout = cfg.runtime, cfg.runtime.timeout_s
        self.timeout = timeout
        roles = role_resources(cfg, use_gpus)
        start = time.perf_counter()
        log.info("placing %d rollout workers, %d reward servers and %d learners (%s)",
                 r.rollout_workers, r.reward_servers, r.learners, r.placement)
        # The scheduler holds the run's state and lives or dies with the driver: keep it on the driver's node.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.scheduler = BudgetScheduler.options(name="scheduler", scheduling_strategy=here).remote(cfg)
        self.rollout = ActorGroup("rollout", RolloutWorker, *roles["rollout"], r.placement, timeout, cfg,
                                  roles["rollout"][1])
        reward_env = yaml.safe_load(Path(cfg.rewards.runtime_env).read_text()) if cfg.rewards.runtime_env else None
        self.reward = ActorGroup("reward", RewardServer, *roles["reward"], r.placement, timeout, cfg,
                                 roles["reward"][1], runtime_env=reward_env)
        self.learners = ActorGroup("learner", LearnerActor, *roles["learner"], r.placement, timeout, cfg,
                                   roles["learner"][1])
        self._setup_learners()
        if cfg.broadcast_weights:
            self.sync: ObjectStoreSync | BroadcastSync = BroadcastSync(
                self.learners.actors, self.rollout.actors, self._get, "nccl" if use_gpus else "gloo", timeout)
        else:
            self.sync = ObjectStoreSync(self.learners.actors, self.rollout.actors, self._get, timeout)
        self.prefetched: PlannedIteration | None = None
        self.state_before_prefetch = None  # the scheduler's state before an overlapped draw (checkpoints)
        version = 0
        if resume is not None:
            version = self._resume(checkpoint_to_resume(self.run_dir, resume))  # verified before it loads
        self.sync.publish(version)
        self._get(self.rollout.actors[0].pid.remote())  # the slowest actors to start; log when they are up
        log.info("actors ready in %.1f s", time.perf_counter() - start)
        self._open_log(resumed=resume is not None)

    def _setup_learners(self) -> None:
        """Two-phase init: rank 0 reports its node's address and a free port, then every rank joins it
        (one collective call, so all ranks meet inside `init_process_group`)."""
        r = self.cfg.runtime
        address = self._get(self.learners.actors[0].address.remote())
        settings = [LearnerSettings(zero_stage=r.zero_stage, bf16=r.bf16, world_size=r.learners, rank=rank,
                                    timeout_s=r.timeout_s, **address) for rank in range(r.learners)]
        self._get([a.setup.remote(s) for a, s in zip(self.learners.actors, settings, strict=True)], "learner setup")
        accelerators = self._get([a.accelerator.remote() for a in self.learners.actors])
        log.info("%d learners joined (DeepSpeed accelerator %s, ZeRO %d%s)", r.learners,
                 "/".join(sorted(set(accelerators))), r.zero_stage, ", bf16" if r.bf16 else "")

    def _get(self, refs, what: str = "actor call"):
        try:
            return ray.get(refs, timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"{what} did not finish in runtime.timeout_s={self.timeout:g} s") from None

    def _resume(self, path: Path) -> int:
        """Load a checkpoint into the learners and the scheduler; returns the weights version it was saved at."""
        folder = resolve_checkpoint(path)
        state = json.loads((folder / "state.json").read_text())
        self._get([a.load_checkpoint.remote(str(folder)) for a in self.learners.actors])
        self._get(self.scheduler.load_state_dict.remote(state["scheduler"]))
        self.start_iteration = state["iteration"] + 1
        self.checkpoint = folder
        log.info("resumed from %s: %d iterations done", folder, self.start_iteration)
        return state.get("weights_version", 0)  # an in-process loop's checkpoint has no versions

    # ------------------------------------------------------------------------------------------------ stages
    # iteration(k): start (plan, probe, submit rollouts) -> collect -> score -> advantages -> learn (and start
    # k+1 under overlap) -> publish the weights. `_chaos` is the one place where a test kills an actor.

    def _chaos(self, role: str, iteration: int) -> None:
        """`chaos.kill` / `chaos.at_iteration`: kill actor 0 of `role` now, while its calls are in flight."""
        if self.cfg.chaos.kill != role or self.cfg.chaos.at_iteration != iteration:
            return
        log.warning("chaos: killing %s-0 mid-iteration", role)
        group = {"rollout": self.rollout, "reward": self.reward, "learner": self.learners}[role]
        ray.kill(group.actors[0], no_restart=role == "learner")  # DeepSpeed ranks cannot come back

    def _start(self, iteration: int) -> PlannedIteration:
        """Draw the iteration's prompts, run AEGPO's entropy probes on the rollout workers when the method asks
        for them, have the scheduler turn the results into the plan, and submit its rollouts (which reuse the
        probes' anchor latents, by reference)."""
        start = time.perf_counter()
        requests = self._get(self.scheduler.draw.remote(iteration))
        probes, anchors, probe_start = None, [], time.perf_counter()
        if requests:
            workers = len(self.rollout)
            bounds = [round(k * len(requests) / workers) for k in range(workers + 1)]
            parts = [requests[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
            calls = [(w, partial(self._probe_call, part)) for w, part in enumerate(parts)]
            results = self._gather(self._submit(calls), "entropy probe")  # contiguous parts: order is kept
            probes = ProbeResult(torch.cat([r.entropy for r, _ in results]),
                                 torch.cat([r.reference for r, _ in results]),
                                 sum(r.transformer_calls for r, _ in results))
            anchors = [({(r.prompt, r.seed) for r in part}, ref) for part, (_, (ref,)) in zip(parts, results, strict=True)]
        probe_end = time.perf_counter()
        plans = self._get(self.scheduler.plan.remote(iteration, probes))
        times = {"time/probe": probe_end - probe_start,
                 "time/schedule": probe_start - start + time.perf_counter() - probe_end}
        rollouts = self._submit_rollouts(plans, training=True, anchors=anchors)
        self._chaos("rollout", iteration)
        return PlannedIteration(iteration, plans, probes, times, rollouts)

    # Rollout-worker calls read the weights and their version when they are made, so a call resubmitted
    # after a weight broadcast carries the version the worker now holds.
    def _probe_call(self, requests, worker):
        return worker.probe.remote(requests, *self.sync.call_args())

    def _rollout_call(self, plans, ids, with_embeddings, anchors, worker):
        return worker.rollout.remote([plans[k] for k in ids], ids, *self.sync.call_args(), with_embeddings, anchors)

    def _submit(self, calls: list[tuple[int, Callable[[Any], Any]]]) -> list[Pending]:
        """Start `call(worker)` for each (rollout worker index, call)."""
        return [Pending(w, call, call(self.rollout.actors[w])) for w, call in calls]

    def _gather(self, pending: list[Pending], what: str) -> list:
        """The results in order: a call's first return, fetched, with the references of its other returns (a
        rollout's: its `RolloutShardRefs`). A worker that restarted and missed a full-weight broadcast answers
        with StaleWeightsError: the weights are sent again and the call remade."""
        results = []
        for p in pending:
            refs = p.refs if isinstance(p.refs, list) else [p.refs]
            try:
                first = self._get(refs[0], what)
            except StaleWeightsError:
                log.warning("rollout-%d restarted and missed the weight broadcast; sending the weights again",
                            p.worker)
                self.sync.recover()
                refs = p.call(self.rollout.actors[p.worker])
                refs = refs if isinstance(refs, list) else [refs]
                first = self._get(refs[0], what)
            results.append((first, refs[1:]) if len(refs) > 1 else first)
        return results

    def _submit_rollouts(self, plans, training: bool = False, anchors: list | None = None) -> list[Pending]:
        """Start the shards of a plan on the rollout workers (split by prompt, balanced by work). Training
        rollouts bring their prompt embeddings when the learners have no text encoders. `anchors`: (keys,
        reference) of the probes' anchor latents; each shard gets the references that hold its prompts."""
        shards = split_by_prompt(plans, len(self.rollout))
        with_embeddings = training and not self.cfg.model.learner_text_encoders
        calls = []
        for w, ids in enumerate(shards):
            if ids:
                keys = {(plans[k].prompt, plans[k].seed) for k in ids}
                refs = [ref for held, ref in anchors or [] if held & keys]
                calls.append((w, partial(self._rollout_call, plans, ids, with_embeddings, refs)))
        return self._submit(calls)

    def _collect(self, plans, pending: list[Pending]) -> tuple[RolloutResult, list[RolloutShardRefs]]:
        """Wait for a plan's rollouts; returns the summaries merged in plan order (no images, no latents)."""
        shards = [RolloutShardRefs(summary, *refs) for summary, refs in self._gather(pending, "rollout")]
        return merge_shards([s.summary for s in shards], len(plans)), shards

    def _score(self, shards: list[RolloutShardRefs], total: int, iteration: int = -1) -> dict[str, torch.Tensor]:
        """Rewards in plan order. Each shard's images go from its rollout worker's output straight to a reward
        server (by reference, round robin over the servers): the driver receives rewards, never pixels."""
        servers = self.reward.actors
        refs = [servers[k % len(servers)].score.remote(shard.images) for k, shard in enumerate(shards)]
        self._chaos("reward", iteration)
        scores = self._get(refs, "reward scoring")
        rewards = {name: torch.full((total,), float("nan")) for name in scores[0]}
        for shard, score in zip(shards, scores, strict=True):
            for name, values in score.items():
                rewards[name][shard.summary.sample_ids] = values
        return rewards

    def _images(self, shards: list[RolloutShardRefs], count: int) -> torch.Tensor:
        """The uint8 images of plan samples 0..count-1, fetched from the shards that hold them."""
        images: dict[int, torch.Tensor] = {}
        for shard in shards:
            wanted = [k for k, plan_id in enumerate(shard.summary.sample_ids) if plan_id < count]
            if wanted:
                fetched = self._get(shard.images)["images"]
                images.update({shard.summary.sample_ids[k]: fetched[k] for k in wanted})
        return torch.stack([images[k] for k in range(count)])

    def evaluate(self) -> tuple[dict[str, float], torch.Tensor]:
        plans = held_out_plan(self.cfg, self.eval_prompts)
        _, shards = self._collect(plans, self._submit_rollouts(plans))
        rewards = self._score(shards, len(plans))
        return eval_metrics(self.cfg, rewards), self._images(shards, min(SHOWN_IMAGES, len(plans)))

    def _learn(self, iteration: int, steps: Batch, shards: list[RolloutShardRefs]) -> dict[str, float]:
        """The learners' step on the trained steps, which travel as references: each rank gets its padded
        slices of every minibatch (small columns, plus where each row's latents are) and the shards' latent
        references, and fetches its rows itself. Under overlap, iteration k+1 starts while they train."""
        minibatches = make_minibatches(steps, self.cfg.train.batch_size, minibatch_seed(self.cfg, iteration),
                                       min_size=len(self.learners))
        per_rank = [ray.put(part) for part in slice_for_ranks(minibatches, len(self.learners))]
        latents = [shard.latents for shard in shards]
        # model.learner_text_encoders=false: the learners' prompt embeddings, put once for all ranks
        embeddings = {p: cond for shard in shards for p, cond in shard.summary.embeddings.items()}
        embeddings = ray.put(embeddings) if embeddings else None
        refs = [a.train.remote(part, latents, embeddings)
                for a, part in zip(self.learners.actors, per_rank, strict=True)]
        self._prefetch(iteration + 1)
        self._chaos("learner", iteration)
        try:
            per_rank = self._get(refs, "learner step")
        except ray.exceptions.RayActorError as e:
            raise ClusterError(
                f"a learner died at iteration {iteration} ({type(e).__name__}); DeepSpeed ranks cannot be "
                f"replaced mid-run. Resume from the last checkpoint ({self.checkpoint or 'none yet'}) with "
                f"`egrpo train CONFIG --resume auto`") from None
        # the ranks' statistics are weighted sums (slice_for_ranks): their mean is the whole minibatch's
        metrics = {k: sum(m[k] for m in per_rank) / len(per_rank) for k in per_rank[0]}
        for key in ("train/ratio_max_dev", "train/first_ratio_max_dev", "train/rollout_logp_mismatch"):
            metrics[key] = max(m[key] for m in per_rank)  # maxima, not means
        for key in ("nfe/train", "train/padding_rows"):  # totals over the ranks
            metrics[key] = sum(m[key] for m in per_rank)
        return metrics

    def iteration(self, iteration: int) -> dict[str, Any]:
        planned, self.prefetched = self.prefetched or self._start(iteration), None
        t1 = time.perf_counter()
        result, shards = self._collect(planned.plans, planned.rollouts)
        for shard in shards:
            self.scheduler.receive.remote(shard.summary.sample_ids)
        t2 = time.perf_counter()
        rewards = self._score(shards, len(planned.plans), iteration)
        steps, metrics = score_rollout(self.cfg, result, rewards)
        metrics.update(self._get(self.scheduler.check_complete.remote()))
        t3 = time.perf_counter()
        if len(steps):
            metrics.update(self._learn(iteration, steps, shards))
        t4 = time.perf_counter()
        self.sync.publish(self.sync.version + 1)
        t5 = time.perf_counter()
        if self.cfg.runtime.sync_check:
            metrics["sync/max_checksum_error"] = self.sync.check()
        staleness = [self.sync.version - 1 - s.summary.weights_version for s in shards]
        metrics.update({
            "time/rollout": t2 - t1, "time/reward": t3 - t2, "time/learn": t4 - t3,
            "time/sync": t5 - t4, "images_per_s": len(result.samples) / (t2 - t1),
            "nfe/rollout": result.transformer_calls, "staleness/max": max(staleness, default=0),
            "weights_version": self.sync.version,
        })
        metrics.update(planned.times)
        if planned.probes is not None:
            metrics.update(probe_metrics(planned.probes, planned.times["time/probe"], t2 - t1))
        return metrics

    def _prefetch(self, iteration: int) -> None:
        """One-step-off overlap (`runtime.overlap`): plan iteration k+1 and start its rollouts now, with the
        weights of iteration k-1, so rollouts run while the learners train. Staleness becomes 1."""
        if not self.cfg.runtime.overlap or iteration >= self.cfg.train.iterations:
            return
        self.state_before_prefetch = self.scheduler.state_dict.remote()  # actor calls run in order
        self.prefetched = self._start(iteration)

    def publish(self, record: dict[str, Any]) -> None:
        self.scheduler.publish.remote(record)

    def load_weights(self, checkpoint: Path) -> None:
        self._get([a.load_checkpoint.remote(str(checkpoint)) for a in self.learners.actors], "checkpoint load")
        self.sync.publish(self.sync.version + 1)

    def save(self, iteration: int) -> Path:
        root = self.run_dir / "checkpoints"
        # with overlap the next iteration is already drawn: save the scheduler as it was before that draw
        scheduler_state = self.state_before_prefetch if self.prefetched is not None else \
            self.scheduler.state_dict.remote()
        state = {"scheduler": self._get(scheduler_state), "weights_version": self.sync.version,
                 "rng": "derived from run.seed and the iteration"}
        paths = self._get([a.save_checkpoint.remote(str(root), iteration, state) for a in self.learners.actors],
                          "checkpoint")
        self.checkpoint = Path(paths[0])
        return self.checkpoint

    def close(self) -> None:
        super().close()
        try:
            ray.get([a.close.remote() for a in self.learners.actors], timeout=30)
        except Exception:  # a dead learner cannot close its process group; Ray reclaims it anyway
            pass
        for group in (self.rollout, self.reward, self.learners):
            group.kill()
        ray.kill(self.scheduler)
