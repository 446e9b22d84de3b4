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
from functools import partial
from pathlib import Path
from typing import Any

import ray
import torch
import yaml
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from egrpo.batch import Batch
from egrpo.checkpoint import resolve_checkpoint
from egrpo.config import Config
from egrpo.learner import make_minibatches
from egrpo.runtime.actors import BudgetScheduler, RewardServer, RolloutShard, RolloutWorker, StaleWeightsError
from egrpo.runtime.learner import LearnerActor, LearnerSettings, slice_for_ranks
from egrpo.runtime.weight_sync import GroupAddress, weights_checksum
from egrpo.sampling.rollout import ProbeResult, RolloutResult
from egrpo.scheduler import split_by_prompt
from egrpo.trainer import (
    TrainingLoop,
    eval_metrics,
    held_out_plan,
    minibatch_seed,
    probe_metrics,
    score_rollout,
)

log = logging.getLogger("egrpo.runtime")

# What every actor's process needs: offline model loading, quiet telemetry, and CPU DeepSpeed when no GPU.
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
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
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
    log.info("starting a local Ray with %d logical CPUs%s", logical_cpus,
             f", dashboard at http://{cfg.runtime.dashboard_host}:8265" if cfg.runtime.dashboard else "")
    # address="local": a new Ray of our own, even when a `ray start` cluster runs on this machine
    ray.init(address="local", num_cpus=logical_cpus, include_dashboard=cfg.runtime.dashboard,
             dashboard_host=cfg.runtime.dashboard_host, runtime_env={"env_vars": env}, log_to_driver=True)


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
    """Put the workers' shards back into plan order, with `sample` indices that refer to the whole plan."""
    samples, steps, calls = [], [], 0
    for shard in shards:
        ids = shard.sample_ids
        s = shard.result.samples
        samples.append(Batch(s.tensors, {**s.meta, "plan": ids}))
        t = shard.result.train_steps
        if len(t):
            steps.append(Batch(t.tensors, {**t.meta, "sample": [ids[k] for k in t["sample"]]}))
        calls += shard.result.transformer_calls
    merged = Batch.concat(samples)
    order = sorted(range(total), key=lambda k: merged["plan"][k])
    train_steps = Batch.concat(steps)
    step_order = sorted(range(len(train_steps)), key=lambda k: train_steps["sample"][k])  # stable: plan order
    return RolloutResult(merged.select(order), train_steps.select(step_order), calls)


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
        self.version = 0
        self.weights, self.weight_store, self.generation, self.sent_checksum = None, None, -1, 0.0
        self.prefetched: tuple | None = None
        self.state_before_prefetch = None  # the scheduler's state before an overlapped draw (checkpoints)
        if resume is not None:
            self._resume(Path(self.run_dir if resume == "auto" else resume))
        self._send_weights()
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

    def _send_weights(self) -> None:
        """Rank 0's trainable weights as version `self.version`: LoRA into the object store (the rollout
        workers fetch it with their next call), full weights broadcast to every rollout worker now. Under
        ZeRO 3 gathering the weights is a collective, so every rank is asked and rank 0's answer kept."""
        gather = [a.join_gather.remote() for a in self.learners.actors[1:]] if self.cfg.runtime.zero_stage == 3 else []
        if not self.cfg.broadcast_weights:
            self.weights = self.learners.actors[0].trainable_state_dict.remote()
            ray.wait([self.weights, *gather], num_returns=1 + len(gather), timeout=self.timeout)
            return
        generations = self._get([w.weight_group_generation.remote() for w in self.rollout.actors])
        if self.generation < 0 or any(g != self.generation for g in generations):
            self._form_weight_group()
        receive = [w.receive_weights.remote(self.version) for w in self.rollout.actors]
        sent = self.learners.actors[0].broadcast_weights.remote()
        self.sent_checksum = self._get([sent, *gather, *receive], "weight broadcast")[0]

    def _form_weight_group(self) -> None:
        """(Re-)form the broadcast group: learner rank 0 and every rollout worker join a new generation. Run
        at start and whenever a rollout worker restarted (it lost its member of the old group)."""
        learner = self.learners.actors[0]
        if self.weight_store is None:
            self.weight_store = self._get(learner.host_weight_store.remote())
        self.generation += 1
        host, port = self.weight_store
        address = GroupAddress(host, port, 1 + len(self.rollout), self.generation,
                               "nccl" if self.use_gpus else "gloo", self.timeout)
        log.info("forming the weight broadcast group (generation %d, %d members)", self.generation,
                 address.world_size)
        self._get([learner.join_weight_group.remote(address)]
                  + [w.join_weight_group.remote(address, rank + 1) for rank, w in enumerate(self.rollout.actors)],
                  "weight group")

    def _get(self, refs, what: str = "actor call"):
        try:
            return ray.get(refs, timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"{what} did not finish in runtime.timeout_s={self.timeout:g} s") from None

    def _resume(self, path: Path) -> None:
        folder = resolve_checkpoint(path)
        state = json.loads((folder / "state.json").read_text())
        self._get([a.load_checkpoint.remote(str(folder)) for a in self.learners.actors])
        self._get(self.scheduler.load_state_dict.remote(state["scheduler"]))
        self.version = state.get("weights_version", 0)  # an in-process loop's checkpoint has no versions
        self.start_iteration = state["iteration"] + 1
        self.checkpoint = folder
        log.info("resumed from %s at iteration %d", folder, self.start_iteration)

    # ------------------------------------------------------------------------------------------------ stages

    def _plan(self, iteration: int) -> tuple[list, ProbeResult | None, dict[str, float]]:
        """Draw the iteration's prompts, run AEGPO's entropy probes on the rollout workers when the method asks
        for them, and have the scheduler turn the results into the plan. Returns (plans, probes, phase times)."""
        start = time.perf_counter()
        requests = self._get(self.scheduler.draw.remote(iteration))
        probes, probe_start = None, time.perf_counter()
        if requests:
            workers = len(self.rollout)
            bounds = [round(k * len(requests) / workers) for k in range(workers + 1)]
            calls = [(w, partial(self._probe_call, requests[a:b]))
                     for w, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)) if b > a]
            results = self._gather(self._submit(calls), "entropy probe")  # contiguous parts: order is kept
            probes = ProbeResult(torch.cat([r.entropy for r in results]), torch.cat([r.reference for r in results]),
                                 sum(r.transformer_calls for r in results))
        probe_end = time.perf_counter()
        plans = self._get(self.scheduler.plan.remote(iteration, probes))
        times = {"time/probe": probe_end - probe_start,
                 "time/schedule": probe_start - start + time.perf_counter() - probe_end}
        return plans, probes, times

    # Rollout-worker calls read the weights and their version when they are made, so a call resubmitted
    # after a weight broadcast carries the version the worker now holds.
    def _probe_call(self, requests, worker):
        return worker.probe.remote(requests, [self.weights], self.version)

    def _rollout_call(self, plans, ids, with_embeddings, worker):
        return worker.rollout.remote([plans[k] for k in ids], ids, [self.weights], self.version, with_embeddings)

    def _submit(self, calls: list[tuple[int, Any]], chaos: bool = False) -> list[tuple[int, Any, Any]]:
        """Start `call(worker)` for each (rollout worker index, call); returns (index, call, reference)."""
        pending = [(w, call, call(self.rollout.actors[w])) for w, call in calls]
        if chaos:
            log.warning("chaos: killing rollout-0 mid-iteration")
            ray.kill(self.rollout.actors[0], no_restart=False)
        return pending

    def _gather(self, pending: list[tuple[int, Any, Any]], what: str) -> list:
        """The results in order. A worker that restarted and missed a full-weight broadcast answers with
        StaleWeightsError: the group is re-formed, the weights sent, and that call made again."""
        results = []
        for w, call, ref in pending:
            try:
                results.append(self._get(ref, what))
            except StaleWeightsError:
                log.warning("rollout-%d restarted and missed the weight broadcast; sending the weights again", w)
                self._send_weights()
                results.append(self._get(call(self.rollout.actors[w]), what))
        return results

    def _submit_rollouts(self, plans, chaos: bool = False, training: bool = False) -> list[tuple[int, Any, Any]]:
        """Start the shards of a plan on the rollout workers (split by prompt, balanced by work). Training
        rollouts bring their prompt embeddings when the learners have no text encoders."""
        shards = split_by_prompt(plans, len(self.rollout))
        with_embeddings = training and not self.cfg.model.learner_text_encoders
        return self._submit([(w, partial(self._rollout_call, plans, ids, with_embeddings))
                             for w, ids in enumerate(shards) if ids], chaos)

    def _rollouts(self, plans, pending: list | None = None) -> tuple[RolloutResult, list[RolloutShard]]:
        results = self._gather(pending if pending is not None else self._submit_rollouts(plans), "rollout")
        return merge_shards(results, len(plans)), results

    def _score(self, samples: Batch, chaos: bool = False) -> dict[str, torch.Tensor]:
        parts = [p for p in samples.split(len(self.reward)) if len(p)]
        refs = [server.score.remote(part) for server, part in zip(self.reward.actors, parts, strict=False)]
        if chaos:
            log.warning("chaos: killing reward-0 mid-iteration")
            ray.kill(self.reward.actors[0], no_restart=False)
        scores = self._get(refs, "reward scoring")
        return {name: torch.cat([s[name] for s in scores]) for name in scores[0]}

    def evaluate(self) -> tuple[dict[str, float], torch.Tensor]:
        result, _ = self._rollouts(held_out_plan(self.cfg, self.eval_prompts))
        images = result.samples["images"]
        return eval_metrics(self.cfg, self._score(result.samples)), images

    def iteration(self, iteration: int) -> dict[str, Any]:
        cfg = self.cfg
        chaos = cfg.chaos.kill if cfg.chaos.at_iteration == iteration else ""
        if self.prefetched is not None:  # started during the previous iteration's learner step
            plans, probes, plan_times, refs = self.prefetched
            self.prefetched = None
        else:
            plans, probes, plan_times = self._plan(iteration)
            refs = self._submit_rollouts(plans, chaos == "rollout", training=True)
        t1 = time.perf_counter()
        result, shards = self._rollouts(plans, refs)
        for shard in shards:
            self.scheduler.receive.remote(shard.sample_ids)
        t2 = time.perf_counter()
        rewards = self._score(result.samples, chaos == "reward")
        steps, metrics = score_rollout(cfg, result, rewards)
        metrics.update(self._get(self.scheduler.check_complete.remote()))
        t3 = time.perf_counter()
        if len(steps):
            minibatches = make_minibatches(steps, cfg.train.batch_size, minibatch_seed(cfg, iteration),
                                           min_size=len(self.learners))
            per_rank = [ray.put(part) for part in slice_for_ranks(minibatches, len(self.learners))]
            # model.learner_text_encoders=false: the learners' prompt embeddings, put once for all ranks
            embeddings = {p: cond for shard in shards for p, cond in shard.embeddings.items()}
            embeddings = ray.put(embeddings) if embeddings else None
            refs = [a.train.remote(part, embeddings)
                    for a, part in zip(self.learners.actors, per_rank, strict=True)]
            self._prefetch(iteration + 1)
            if chaos == "learner":
                log.warning("chaos: killing learner-0 mid-iteration")
                ray.kill(self.learners.actors[0], no_restart=True)
            try:
                per_rank = self._get(refs, "learner step")
                metrics.update({k: sum(m[k] for m in per_rank) / len(per_rank) for k in per_rank[0]})
            except ray.exceptions.RayActorError as e:
                raise ClusterError(
                    f"a learner died at iteration {iteration} ({type(e).__name__}); DeepSpeed ranks cannot be "
                    f"replaced mid-run. Resume from the last checkpoint ({self.checkpoint or 'none yet'}) with "
                    f"`egrpo train CONFIG --resume auto`") from None
        t4 = time.perf_counter()
        self.version += 1
        self._send_weights()
        t5 = time.perf_counter()
        if cfg.runtime.sync_check:
            metrics["sync/max_checksum_error"] = self.sync_check()
        staleness = [self.version - 1 - s.weights_version for s in shards]
        metrics.update({
            "time/rollout": t2 - t1, "time/reward": t3 - t2, "time/learn": t4 - t3,
            "time/sync": t5 - t4, "images_per_s": len(result.samples) / (t2 - t1),
            "nfe/rollout": result.transformer_calls, "staleness/max": max(staleness, default=0),
            "weights_version": self.version,
        })
        metrics.update(plan_times)
        if probes is not None:
            metrics.update(probe_metrics(probes, plan_times["time/probe"], t2 - t1))
        return metrics

    def _prefetch(self, iteration: int) -> None:
        """One-step-off overlap (`runtime.overlap`): plan iteration k+1 and start its rollouts now, with the
        weights of iteration k-1, so rollouts run while the learners train. Staleness becomes 1."""
        if not self.cfg.runtime.overlap or iteration >= self.cfg.train.iterations:
            return
        self.state_before_prefetch = self.scheduler.state_dict.remote()  # actor calls run in order
        plans, probes, plan_times = self._plan(iteration)
        chaos = self.cfg.chaos.kill == "rollout" and self.cfg.chaos.at_iteration == iteration
        self.prefetched = (plans, probes, plan_times, self._submit_rollouts(plans, chaos, training=True))

    def publish(self, record: dict[str, Any]) -> None:
        self.scheduler.publish.remote(record)

    def load_weights(self, checkpoint: Path) -> None:
        self._get([a.load_checkpoint.remote(str(checkpoint)) for a in self.learners.actors], "checkpoint load")
        self.version += 1
        self._send_weights()

    def sync_check(self) -> float:
        """Push the current weights to every rollout worker now and compare their checksums with rank 0's."""
        if self.cfg.broadcast_weights:  # already received by every worker in `_send_weights`
            sent = self.sent_checksum
        else:
            sent = weights_checksum(ray.get(self.weights))
            self._get([w.sync.remote([self.weights], self.version) for w in self.rollout.actors])
        received = self._get([w.weights_checksum.remote() for w in self.rollout.actors])
        return max(abs(r - sent) for r in received)

    def save(self, iteration: int) -> Path:
        root = self.run_dir / "checkpoints"
        # with overlap the next iteration is already drawn: save the scheduler as it was before that draw
        scheduler_state = self.state_before_prefetch if self.prefetched is not None else \
            self.scheduler.state_dict.remote()
        state = {"scheduler": self._get(scheduler_state), "weights_version": self.version,
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
