"""The in-process reference loop: plan -> rollout -> reward -> advantages -> update, one iteration at a time.

It is the algorithm with nothing distributed around it. The Ray runtime runs the same pieces (`run_plan`,
`score_rollout`, `GRPOLearner`) inside actors, and tests compare the two.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from egrpo.algo.advantages import group_advantages, tree_advantages
from egrpo.batch import Batch
from egrpo.checkpoint import (
    checkpoint_to_resume,
    load_checkpoint,
    load_torch_optimizer,
    save_checkpoint,
    save_torch_optimizer,
)
from egrpo.config import Config, dump_config, to_dict
from egrpo.data.prompts import load_prompts
from egrpo.learner import GRPOLearner, make_minibatches
from egrpo.methods import noise_spec, plan_method, schedule_sigmas
from egrpo.report import (
    START_IMAGES,
    MetricsLog,
    falling_components,
    load_start_images,
    mean_or_nan,
    plot_reward_curve,
    save_image_grid,
    save_start_images,
)
from egrpo.rewards.base import build_reward_models, score_samples
from egrpo.sampling.plans import ode_plan
from egrpo.sampling.rollout import ProbeResult, RolloutResult, SamplerSettings, probe_entropies, run_plan
from egrpo.scheduler import Scheduler

log = logging.getLogger("egrpo")

TOY_CHECKPOINT = Path(__file__).parent / "toyworld" / "checkpoint"
EVAL_SEED = 10_000  # held-out samples use seeds EVAL_SEED + k, the same at every evaluation
SHOWN_IMAGES = 8  # held-out samples in the before/after grids (`evaluate` returns at least these images)


def resolve_model_path(path: str) -> Path:
    return TOY_CHECKPOINT if path == "toy" else Path(path)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_policy(cfg: Config, device: torch.device | None = None, keep_reference: bool | None = None):
    """The configured policy, finetuning set up. `keep_reference`: whether this process reads the reference
    policy (a full-weight copy under full finetuning); default: when anything in the run does (KL, AEGPO)."""
    from egrpo.models.policy import FlowPolicy

    m = cfg.model
    policy = FlowPolicy.from_pretrained(
        resolve_model_path(m.path), device=device or pick_device(cfg.run.device), dtype=getattr(torch, m.dtype),
        height=m.height, width=m.width, guidance=m.guidance, max_sequence_length=m.max_sequence_length,
        cfg_scale=m.cfg_scale,
    )
    with torch.random.fork_rng(devices=[]):  # the LoRA init is the same in every process (learners, workers)
        torch.manual_seed(cfg.run.seed)
        if keep_reference is None:
            keep_reference = cfg.train.kl_beta > 0 or plan_method(cfg).needs_probes
        policy.setup_finetune(m.finetune, rank=m.lora_rank, alpha=m.lora_alpha, targets=m.lora_targets,
                              keep_reference=keep_reference)
    if m.gradient_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    if cfg.sampler.vae_tiling:
        policy.enable_vae_tiling()
    return policy


def load_reward_models(cfg: Config) -> list:
    """The models behind the configured rewards, from `rewards.paths`, on the run's device."""
    return build_reward_models(cfg.rewards.weights, cfg.rewards.paths, str(pick_device(cfg.run.device)))


CUDA_DECODE_BATCH_SIZE = 4  # FLUX's VAE needs ~1.35 GiB per 720x720 image in bf16: a batch of 32, ~43 GB


def resolve_decode_batch_size(decode_batch_size: int, batch_size: int, device: torch.device) -> int:
    """Images per VAE decode call: `sampler.decode_batch_size`, or when that is 0, CUDA_DECODE_BATCH_SIZE on a
    CUDA device and the transformer batch (`sampler.batch_size`) elsewhere."""
    if decode_batch_size:
        return decode_batch_size
    return CUDA_DECODE_BATCH_SIZE if device.type == "cuda" else batch_size


def sampler_settings(cfg: Config, device: torch.device | None = None) -> SamplerSettings:
    """The rollout sampler's settings, the decode batch resolved for `device`: the policy's (default: the run's
    device, where `load_policy` puts it)."""
    s = cfg.sampler
    decode_batch_size = resolve_decode_batch_size(s.decode_batch_size, s.batch_size,
                                                  device or pick_device(cfg.run.device))
    return SamplerSettings(schedule_sigmas(cfg), noise_spec(cfg), s.logprob_reduction, s.decode_from,
                           batch_size=s.batch_size, decode_batch_size=decode_batch_size)


def probe_settings(cfg: Config):
    """The attention-entropy probe's settings from `aegpo.*`; rows are sampled with the run's seed, the same
    at every call, so E(t) curves compare across steps, iterations and the reference."""
    from egrpo.entropy.attention import ProbeSettings

    a = cfg.aegpo
    return ProbeSettings(blocks=a.probe_blocks, heads=a.probe_heads, rows=a.probe_rows, chunk=a.probe_chunk,
                         seed=cfg.run.seed)


def score_rollout(cfg: Config, result: RolloutResult, rewards: dict[str, torch.Tensor]) -> tuple[Batch, dict]:
    """Advantages attached to the trained steps that have one, and reward metrics. Per sample within its plan
    group; for a tree (Config.tree_plan), per node within its tree's depth."""
    weights, t = cfg.rewards.weights, cfg.train
    steps = result.train_steps
    if cfg.tree_plan and len(steps):
        tree_depth = [result.samples["group"][s] * (cfg.sampler.steps + 1) + depth
                      for s, depth in zip(steps["sample"], steps["depth"], strict=True)]
        adv = tree_advantages(rewards, steps["leaves"], tree_depth, weights, cfg.rewards.combine, t.adv_clip,
                              t.adv_std_ddof)
        steps.tensors["advantage"] = adv.values
        steps = steps.select(adv.valid)
    else:
        adv = group_advantages(rewards, result.samples["group"], weights, cfg.rewards.combine, t.adv_clip,
                               t.adv_std_ddof)
        if len(steps):
            sample_of_step = torch.tensor(steps["sample"], dtype=torch.long)
            steps.tensors["advantage"] = adv.values[sample_of_step]
            steps = steps.select(adv.valid[sample_of_step])
    total = sum(w * rewards[name] for name, w in weights.items())
    metrics = {"reward/mean": mean_or_nan(total), "reward/nan_dropped": adv.dropped_nan,
               "train/steps": len(steps), "samples": len(result.samples)}
    metrics.update({f"reward/{name}": mean_or_nan(rewards[name]) for name in weights})
    return steps, metrics


@dataclass
class RunOutputs:
    run_dir: Path
    metrics: Path
    reward_curve: Path
    sample_grid: Path
    checkpoint: Path | None


def held_out_plan(cfg: Config, prompts: list[str]) -> list:
    """Deterministic (ODE) samples of the held-out prompts, `train.eval_seeds` each, with the same seeds at
    every evaluation. Sample k * len(prompts) + j is prompt j's k-th seed, so the first row is one per prompt."""
    repeated = prompts * cfg.train.eval_seeds
    return ode_plan(repeated, [EVAL_SEED + k for k in range(len(repeated))], cfg.sampler.steps)


def eval_metrics(cfg: Config, rewards: dict[str, torch.Tensor]) -> dict[str, float]:
    weights = cfg.rewards.weights
    metrics = {"eval/reward_mean": mean_or_nan(sum(w * rewards[n] for n, w in weights.items()))}
    metrics.update({f"eval/{n}": mean_or_nan(rewards[n]) for n in weights})
    return metrics


class TrainingLoop:
    """The schedule every backend shares: evaluate, iterate, evaluate and checkpoint on schedule, plot.

    A backend provides `evaluate()`, `iteration(k)`, `save(k)`, `close()` and the fields set in `_setup_run`."""

    cfg: Config
    eval_prompts: list[str]
    start_iteration: int
    checkpoint: Path | None
    log: MetricsLog

    def _setup_run(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.eval_prompts = load_prompts(cfg.data.eval_prompts)[: cfg.train.eval_prompts]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.run_dir / "config.yaml")
        self.start_iteration = 0
        self.checkpoint = None

    def _open_log(self, resumed: bool) -> None:
        self.log = MetricsLog(self.run_dir, self.cfg.run.wandb, to_dict(self.cfg), resume=resumed)
        if resumed:  # drop what a crashed run logged after its checkpoint, so the log reads as one run
            kept = [r for r in self.log.records() if r.get("iteration", 0) <= self.start_iteration]
            self.log.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def evaluate(self) -> tuple[dict[str, float], torch.Tensor]:
        raise NotImplementedError

    def iteration(self, iteration: int) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, iteration: int) -> Path:
        raise NotImplementedError

    def publish(self, record: dict[str, Any]) -> None:
        """Show an iteration's full record (evaluation included) beyond metrics.jsonl; the Ray runtime sets
        its dashboard gauges here."""

    def load_weights(self, checkpoint: Path) -> None:
        """Use a checkpoint's trained weights from now on (evaluation; resuming also restores the loop)."""
        raise NotImplementedError

    def close(self) -> None:
        self.log.close()

    def _outputs(self) -> RunOutputs:
        return RunOutputs(self.run_dir, self.log.path, self.run_dir / "reward_curve.png",
                          self.run_dir / "samples.png", self.checkpoint)

    def _start_row(self) -> tuple[torch.Tensor, str]:
        """The first row of samples.png and its label. A fresh run evaluates the base model (logged as
        iteration 0) and keeps its images in START_IMAGES; a resumed run reads them back, so its grid still
        compares against the base model. A resumed run folder without them (from before they were kept, or
        whose held-out prompts changed) shows the resumed checkpoint's samples instead, labelled as such."""
        shown = self.eval_prompts[:SHOWN_IMAGES]
        path = self.run_dir / START_IMAGES
        if self.start_iteration > 0:
            stored = load_start_images(path, shown)
            if stored is not None:
                return stored, "start"
            log.warning("%s is missing or shows other held-out prompts: the first row of samples.png shows the "
                        "resumed checkpoint's samples (labelled iter %d), not the base model's", path,
                        self.start_iteration)
        metrics, images = self.evaluate()
        images = images[: len(shown)]
        if self.start_iteration > 0:
            return images, f"iter {self.start_iteration}"
        log.info("held-out reward before training: %.3f", metrics["eval/reward_mean"])
        self.log.log({"iteration": 0, **metrics})
        save_start_images(path, images, shown)
        return images, "start"

    def run(self) -> RunOutputs:
        cfg = self.cfg
        last = cfg.train.iterations - 1
        if self.start_iteration > last:  # resumed from the run's last checkpoint: nothing to train or rewrite
            log.info("the run is complete: %s is iteration %d of train.iterations=%d", self.checkpoint,
                     self.start_iteration, cfg.train.iterations)
            self.close()
            return self._outputs()
        start_images, start_label = self._start_row()
        images = start_images
        # a terminal gets a progress bar; a log file (a Ray job, CI) a line every 5% of the run instead of
        # one very long line of carriage returns
        interactive = sys.stderr.isatty()
        bar = tqdm(range(self.start_iteration, cfg.train.iterations), desc=f"{cfg.plan.method} training",
                   unit="it", initial=self.start_iteration, total=cfg.train.iterations, disable=not interactive)
        every = max(1, cfg.train.iterations // 20)
        held_out = [r["eval/reward_mean"] for r in self.log.records() if "eval/reward_mean" in r]
        last_eval = held_out[-1] if held_out else float("nan")
        started = time.perf_counter()
        try:
            for it in bar:
                record = {"iteration": it + 1, **self.iteration(it)}
                if it == last or (cfg.train.eval_every and (it + 1) % cfg.train.eval_every == 0):
                    eval_record, images = self.evaluate()
                    record.update(eval_record)
                self.log.log(record)
                self.publish(record)
                last_eval = record.get("eval/reward_mean", last_eval)
                bar.set_postfix(reward=f"{record['reward/mean']:.3f}", held_out=f"{last_eval:.3f}")
                if not interactive and ((it + 1) % every == 0 or it == last):
                    seconds = (time.perf_counter() - started) / (it + 1 - self.start_iteration)
                    log.info("iteration %d/%d: reward %.3f, last held-out reward %.3f, %.1f s/iteration", it + 1,
                             cfg.train.iterations, record["reward/mean"], last_eval, seconds)
                if it == last or (it + 1) % cfg.train.checkpoint_every == 0:
                    self.save(it)
            outputs = self._outputs()
            records = self.log.records()
            plot_reward_curve(records, outputs.reward_curve, f"{cfg.run.name} ({cfg.plan.method})",
                              cfg.rewards.weights)
            for warning in falling_components(records, cfg.rewards.weights):
                log.warning(warning)
            shown = len(start_images)
            save_image_grid([start_images, images[:shown]], [start_label, "end"], self.eval_prompts[:shown],
                            outputs.sample_grid)
        finally:
            self.close()
        return outputs


class Trainer(TrainingLoop):
    """The in-process reference loop: every piece runs in this process, with a torch optimiser."""

    def __init__(self, cfg: Config, resume: str | None = None) -> None:
        self._setup_run(cfg)
        self.policy = load_policy(cfg)
        self.reward_models = load_reward_models(cfg)
        self.scheduler = Scheduler(cfg)
        self.learner = GRPOLearner(self.policy, cfg.train, cfg.sampler.logprob_reduction)
        self.settings = sampler_settings(cfg)
        if resume is not None:
            state = load_checkpoint(checkpoint_to_resume(self.run_dir, resume), self.policy)
            load_torch_optimizer(self.learner.optimizer, Path(state["path"]))
            self.scheduler.load_state_dict(state["scheduler"])
            self.start_iteration = state["iteration"] + 1
            self.checkpoint = Path(state["path"])
            log.info("resumed from %s: %d iterations done", state["path"], self.start_iteration)
        self._open_log(resumed=resume is not None)

    def evaluate(self) -> tuple[dict[str, float], torch.Tensor]:
        """Mean rewards of deterministic (ODE) samples on the held-out prompts, with fixed seeds; their uint8
        images."""
        result = run_plan(self.policy, held_out_plan(self.cfg, self.eval_prompts), self.settings)
        images = result.samples["images"]
        return eval_metrics(self.cfg, score_samples(self.reward_models, result.samples)), images

    def iteration(self, iteration: int) -> dict[str, Any]:
        cfg = self.cfg
        requests = self.scheduler.draw(iteration)
        t_probe = time.perf_counter()
        probes, anchors = (probe_entropies(self.policy, requests, self.settings, probe_settings(cfg),
                                           cfg.aegpo_peak_steps) if requests else (None, None))
        t0 = time.perf_counter()
        plans = self.scheduler.plan(iteration, probes)
        result = run_plan(self.policy, plans, self.settings, anchors)
        self.scheduler.receive(result.samples["plan"])
        t1 = time.perf_counter()
        rewards = score_samples(self.reward_models, result.samples)
        steps, metrics = score_rollout(cfg, result, rewards)
        metrics.update(self.scheduler.check_complete())
        t2 = time.perf_counter()
        if len(steps):
            minibatches = make_minibatches(steps, cfg.train.batch_size, seed=minibatch_seed(cfg, iteration))
            metrics.update(self.learner.train_iteration(minibatches))
        t3 = time.perf_counter()
        metrics.update({"time/rollout": t1 - t0, "time/reward": t2 - t1, "time/learn": t3 - t2,
                        "images_per_s": len(result.samples) / (t1 - t0), "nfe/rollout": result.transformer_calls})
        if probes is not None:
            metrics.update(probe_metrics(probes, t0 - t_probe, t1 - t0))
        return metrics

    def load_weights(self, checkpoint: Path) -> None:
        load_checkpoint(checkpoint, self.policy)

    def save(self, iteration: int) -> Path:
        state = {"scheduler": self.scheduler.state_dict(), "rng": "derived from run.seed and the iteration"}
        self.checkpoint = save_checkpoint(self.run_dir / "checkpoints", iteration, self.policy, state,
                                          save_torch_optimizer(self.learner.optimizer))
        return self.checkpoint


def probe_metrics(probes: ProbeResult, probe_seconds: float, rollout_seconds: float) -> dict[str, float]:
    return {"time/probe": probe_seconds, "nfe/probe": probes.transformer_calls,
            "entropy/probe_time_share": probe_seconds / (probe_seconds + rollout_seconds)}


def minibatch_seed(cfg: Config, iteration: int) -> int:
    return cfg.run.seed * 100_003 + iteration
