"""The plan methods, by name (`plan.method`): what each needs before it can plan, and how it builds its plan
from the config. This is where config keys turn into the plain arguments of `egrpo.sampling.plans`.

A method that `needs_probes` (AEGPO) gets the attention-entropy probes of the iteration's prompts first: the
scheduler turns them into each prompt's rollout budget and exploration steps (`EntropyGuidance`). A plan that
is a tree (`Config.tree_plan`) gets advantages per tree node instead of per sample
(egrpo.algo.advantages.tree_advantages).
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from egrpo.config import Config, ModelConfig
from egrpo.sampling import plans as P
from egrpo.sampling.steps import NoiseSpec, sigma_schedule, step_entropy


@dataclass(frozen=True)
class EntropyGuidance:
    """What the scheduler made of an iteration's probes, per prompt: its rollout budget and its exploration
    steps (AEGPO's independent reading: the peaks; the tree reading: the split steps)."""

    group_sizes: list[int]
    explore_steps: list[list[int]]


@dataclass(frozen=True)
class PlanMethod:
    name: str
    needs_probes: bool
    build: Callable[[Config, list[str], int, random.Random, EntropyGuidance | None], list[P.SamplePlan]]


def noise_spec(cfg: Config) -> NoiseSpec:
    return NoiseSpec(cfg.sampler.noise, cfg.sampler.noise_level)


def schedule_sigmas(cfg: Config) -> torch.Tensor:
    """The run's sigmas (`sampler.schedule`): egrpo's shift(1 - i/T), or the model's own pipeline's."""
    if resolved_schedule(cfg) == "shift":
        return sigma_schedule(cfg.sampler.steps, cfg.sampler.shift)
    return _pipeline_schedule(cfg.model, cfg.sampler.steps).clone()


def resolved_schedule(cfg: Config) -> str:
    """`sampler.schedule`, with `family` replaced by the model family's `default_schedule`: the one the public
    RL code for that family samples with."""
    if cfg.sampler.schedule != "family":
        return cfg.sampler.schedule
    from egrpo.models.families import policy_class

    return policy_class(model_family(cfg.model.path)).default_schedule


@functools.lru_cache(maxsize=8)
def model_family(path: str) -> str:
    """The family of the pipeline at model.path (or of the shipped configs named like it), from its
    model_index.json alone."""
    from egrpo.config import ConfigError
    from egrpo.memory import _architecture_folder
    from egrpo.models.families import PIPELINE_FAMILIES
    from egrpo.trainer import resolve_model_path

    folder, _ = _architecture_folder(resolve_model_path(path).expanduser())
    name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    if name not in PIPELINE_FAMILIES:
        raise ConfigError(f"model.path: {folder / 'model_index.json'} names a {name}; egrpo supports "
                          f"{', '.join(sorted(PIPELINE_FAMILIES))}")
    return PIPELINE_FAMILIES[name]


@functools.lru_cache(maxsize=8)
def _pipeline_schedule(model: ModelConfig, steps: int) -> torch.Tensor:
    """The model family's `pipeline_sigmas` from model.path's configs (or the shipped ones, as `egrpo plan
    --memory` reads them) at the run's image size; cached, since plans ask for it every iteration."""
    from egrpo.memory import load_architecture
    from egrpo.models.families import policy_class

    arch = load_architecture(Config(model=model))
    scheduler_config = json.loads((arch.folder / "scheduler" / "scheduler_config.json").read_text())
    return policy_class(arch.transformer.family).pipeline_sigmas(scheduler_config, steps, arch.image_tokens)


def egrpo_merge_lengths(cfg: Config) -> list[int]:
    sigmas = schedule_sigmas(cfg)
    return P.merge_lengths(sigmas, noise_spec(cfg), cfg.egrpo.tau, cfg.egrpo_active_steps)


def aegpo_merge_lengths(cfg: Config) -> list[int]:
    """Length of the SDE step at each step of the schedule: E-GRPO's merge lengths with `aegpo.merge`, else 1."""
    if not cfg.aegpo.merge:
        return [1] * cfg.sampler.steps
    sigmas = schedule_sigmas(cfg)
    return P.merge_lengths(sigmas, noise_spec(cfg), cfg.egrpo.tau, cfg.sampler.steps)


def tree_splits(cfg: Config, group_size: int) -> int:
    """Split steps of a tree of about `group_size` leaves: round(log_factor(G)), at least 1."""
    return max(1, round(math.log(group_size) / math.log(cfg.tree.factor)))


def branch_split_points(cfg: Config) -> list[int]:
    """`branch`'s fixed split steps: `tree.split_points`, else BranchGRPO's uniform ones."""
    return list(cfg.tree.split_points) or P.uniform_split_points(cfg.sampler.steps, cfg.tree.splits)


def _random_seeds(prompts: list[str], rng: random.Random) -> list[int]:
    return [rng.getrandbits(31) for _ in prompts]


def _grpo(cfg, prompts, iteration, rng, guidance):
    return P.grpo_plan(prompts, _random_seeds(prompts, rng), cfg.plan.group_size, cfg.sampler.steps,
                       cfg.grpo.train_fraction, rng)


def _mix(cfg, prompts, iteration, rng, guidance):
    m, steps = cfg.mix, cfg.sampler.steps
    start = P.mix_window_start(m.start, m.window, m.move_every, steps, iteration)
    return P.mix_plan(prompts, _random_seeds(prompts, rng), cfg.plan.group_size, steps, start, m.window, rng)


def _egrpo(cfg, prompts, iteration, rng, guidance):
    return P.egrpo_plan(prompts, _random_seeds(prompts, rng), cfg.plan.group_size, cfg.sampler.steps,
                        egrpo_merge_lengths(cfg), rng)


def _branch(cfg, prompts, iteration, rng, guidance):
    points = branch_split_points(cfg)
    return P.tree_plan(prompts, _random_seeds(prompts, rng), [points] * len(prompts), [1] * cfg.sampler.steps,
                       cfg.sampler.steps, cfg.tree.factor, cfg.tree.between, rng)


def _aegpo(cfg, prompts, iteration, rng, guidance):
    if guidance is None:
        raise ValueError("an aegpo plan needs each prompt's budget and exploration steps from the entropy probes")
    seeds = [P.prompt_seed(cfg.run.seed, p) for p in prompts]
    lengths, steps = aegpo_merge_lengths(cfg), cfg.sampler.steps
    if cfg.aegpo.rollout == "tree":
        return P.tree_plan(prompts, seeds, guidance.explore_steps, lengths, steps, cfg.tree.factor,
                           cfg.tree.between, rng)
    return P.aegpo_plan(prompts, seeds, guidance.group_sizes, guidance.explore_steps, lengths, steps, rng)


METHODS = {m.name: m for m in (
    PlanMethod("grpo", False, _grpo),
    PlanMethod("mix", False, _mix),
    PlanMethod("egrpo", False, _egrpo),
    PlanMethod("aegpo", True, _aegpo),
    PlanMethod("branch", False, _branch),
)}


def plan_method(cfg: Config) -> PlanMethod:
    return METHODS[cfg.plan.method]


def build_plan(cfg: Config, prompts: list[str], iteration: int, guidance: EntropyGuidance | None = None
               ) -> list[P.SamplePlan]:
    """The iteration's plan for the configured method; deterministic in (run.seed, iteration, prompts, guidance)."""
    rng = random.Random(f"{cfg.run.seed}/{iteration}")
    return plan_method(cfg).build(cfg, prompts, iteration, rng, guidance)


def describe_schedule(cfg: Config) -> dict:
    """What `egrpo plan` prints: per step sigma and one-step entropy; the active steps and their merge lengths."""
    sigmas = schedule_sigmas(cfg)
    noise = noise_spec(cfg)
    active = list(range(cfg.egrpo_active_steps))
    return {
        "sigmas": [float(s) for s in sigmas],
        "step_entropy": [step_entropy(noise, sigmas, i, 1) for i in range(cfg.sampler.steps)],
        "active_steps": active,
        "merge_lengths": egrpo_merge_lengths(cfg),
        "tau": cfg.egrpo.tau,
        "schedule": resolved_schedule(cfg),
    }
