"""Typed, frozen run configuration.

A recipe is a YAML file whose nesting mirrors `Config` below; `--set a.b=c` overrides one field. Every field
has a default and a one-line help text (`metadata["help"]`). Loading checks names, types and values and raises
`ConfigError` naming the offending key, before anything heavy is imported or started.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key."""


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("egrpo", "run name; outputs go to <dir>/<name>/")
    dir: str = _f("runs", "parent folder of run folders")
    seed: int = _f(0, "seed of prompt sampling, initial noise and SDE noise")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto picks CUDA when present")
    wandb: Literal["offline", "online", "disabled"] = _f("offline", "wandb mode; offline writes under the run folder")


@dataclass(frozen=True)
class ModelConfig:
    path: str = _f("toy", "local diffusers pipeline folder, or 'toy' for the committed toy checkpoint")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "compute dtype of the transformer")
    finetune: Literal["lora", "full"] = _f("lora", "train a LoRA adapter, or every transformer weight")
    lora_rank: int = _f(8, "LoRA rank r")
    lora_alpha: float = _f(8.0, "LoRA alpha (scale = alpha / r)")
    lora_targets: tuple[str, ...] = _f(
        ("attention",),
        "module-name suffixes that get LoRA adapters, or presets: attention (every family's attention projections) "
        "or the family's name (attention and MLPs): flux, sd3, qwen-image, flux2, z-image (egrpo/models/families/)",
    )
    learner_text_encoders: bool = _f(
        True, "false: learners free their text encoders (FLUX: ~9.5 GB) and get prompt embeddings from the rollouts"
    )
    gradient_checkpointing: bool = _f(False, "recompute the transformer's activations in the backward pass (less memory)")
    guidance: float = _f(3.5, "distilled guidance scale (FLUX.1-dev); ignored by models without guidance embedding")
    cfg_scale: float = _f(1.0, "classifier-free guidance scale for SD3 (1 = off); sampling and training both use it")
    height: int = _f(0, "image height in pixels; 0 = the model folder's default")
    width: int = _f(0, "image width in pixels; 0 = the model folder's default")
    max_sequence_length: int = _f(0, "T5 tokens per prompt; 0 = the model folder's egrpo.json, else 512")


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = _f(16, "denoising steps T")
    schedule: Literal["family", "shift", "pipeline"] = _f(
        "family", "sigmas: shift(1 - i/T) (DanceGRPO, VisualGRPO, MixGRPO on FLUX), or the model's own pipeline's "
        "(Flow-GRPO on SD3; FLUX.1-dev's resolution-dependent shift; each family's `pipeline_sigmas`); family: "
        "what the RL code for the model's family uses: shift for FLUX.1, pipeline for SD3, Qwen-Image, FLUX.2 "
        "and Z-Image"
    )
    shift: float = _f(3.0, "schedule shift s in sigma = s t / (1 + (s - 1) t) (schedule: shift)")
    noise: Literal["flow_grpo", "dance"] = _f("flow_grpo", "SDE noise form: g = a sqrt(sigma/(1-sigma)) or g = eta")
    noise_level: float = _f(0.7, "a (flow_grpo) or eta (dance)")
    logprob_reduction: Literal["mean", "sum"] = _f("mean", "reduction of the per-element Gaussian log-prob")
    decode_from: Literal["final", "x0_hat"] = _f("final", "decode the final latent, or x0_hat of the last step")
    batch_size: int = _f(32, "samples per transformer call in rollouts (bounds the rollout's activation memory)")
    decode_batch_size: int = _f(
        0, "images per VAE decode call; 0 = 4 on CUDA (FLUX's VAE: ~1.35 GiB per 720x720 image in bf16), else batch_size"
    )
    vae_tiling: bool = _f(False, "decode in overlapping tiles (diffusers' enable_tiling): bounded memory at any size")


@dataclass(frozen=True)
class PlanConfig:
    method: Literal["grpo", "mix", "egrpo", "aegpo", "branch"] = _f(
        "egrpo", "rollout plan: which steps explore (egrpo.methods)"
    )
    group_size: int = _f(4, "G: samples whose advantages are normalised together")
    prompts_per_iteration: int = _f(4, "prompts drawn each iteration")


@dataclass(frozen=True)
class GrpoConfig:
    train_fraction: float = _f(0.6, "fraction of steps (drawn at random per sample) on which the loss is taken")


@dataclass(frozen=True)
class MixConfig:
    window: int = _f(4, "w: SDE steps in the sliding window")
    start: int = _f(0, "l: first window start")
    move_every: int = _f(25, "tau: iterations between moves of the window by one step")


@dataclass(frozen=True)
class EgrpoConfig:
    tau: float = _f(2.2, "entropy threshold on exp(h) per element for a step to count as high-entropy")
    active_steps: int = _f(0, "K: steps from the noise end that may explore; 0 = steps / 2")


@dataclass(frozen=True)
class TreeConfig:
    factor: int = _f(2, "children per split: a tree with s split steps has factor^s leaves")
    between: Literal["ode", "sde"] = _f(
        "ode", "steps between splits: ode (TreeGRPO: SDE only where the tree splits) or sde (BranchGRPO)"
    )
    split_points: tuple[int, ...] = _f((), "branch: the fixed split steps; empty = BranchGRPO's i * (T // splits)")
    splits: int = _f(4, "branch: number of uniform split steps when split_points is empty")


@dataclass(frozen=True)
class AegpoConfig:
    rollout: Literal["independent", "tree"] = _f(
        "tree", "each prompt's rollouts: a tree splitting at its entropy peaks (ours: it benchmarks better, "
        "BENCHMARKS.md), or independent samples exploring at every peak"
    )
    budget: Literal["uniform", "median_split", "proportional"] = _f(
        "median_split", "how dE turns into rollouts per prompt (the iteration's total stays prompts x group_size)"
    )
    g_high: int = _f(16, "median_split: weight of prompts with dE at or above the median")
    g_low: int = _f(8, "median_split: weight of the other prompts")
    alpha: float = _f(1.0, "proportional: G_i ~ dE_i ** alpha")
    g_min: int = _f(2, "fewest rollouts (group size) a prompt gets")
    g_max: int = _f(32, "most rollouts (group size) a prompt gets")
    peaks: int = _f(4, "k: explore at the top-k local maxima of the attention entropy E(t)")
    peak_steps: int = _f(
        0, "peaks are sought in E(t) over the first N steps, and the probe runs those steps only (dE is their mean); "
        "0 = steps / 2 (late steps teach little: E-GRPO)"
    )
    merge: bool = _f(False, "use E-GRPO's merge lengths (egrpo.tau) for the SDE step at each peak")
    probe_blocks: tuple[int, ...] = _f((), "attention blocks probed, in forward order; empty = all")
    probe_heads: tuple[int, ...] = _f((), "heads probed; empty = all")
    probe_rows: int = _f(64, "image-query rows sampled per attention call")
    probe_chunk: int = _f(128, "query rows per softmax chunk (bounds the probe's memory)")


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = _f(100, "training iterations")
    lr: float = _f(1e-4, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    clip_range: float = _f(1e-4, "PPO ratio clip epsilon")
    adv_clip: float = _f(5.0, "advantages are clipped to [-adv_clip, adv_clip]")
    adv_std_ddof: int = _f(0, "std of a group's rewards: 0 population (ours), 1 sample std (torch.std, as DanceGRPO)")
    kl_beta: float = _f(0.0, "weight of the KL term to the reference policy; 0 = off")
    kl_form: Literal["egrpo", "flow_grpo"] = _f(
        "egrpo", "KL per element: ||mu - mu_ref||^2 / (2 g^2 |delta|) (the transition's), or / (2 g^2) (Flow-GRPO's code)"
    )
    batch_size: int = _f(16, "trained (sample, step) pairs per optimiser step")
    micro_batch_size: int = _f(
        0, "rows per forward/backward on a learner; gradients accumulate to one step per minibatch (0 = all)"
    )
    epochs: int = _f(1, "passes over an iteration's trained steps")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 = off")
    checkpoint_every: int = _f(10, "iterations between checkpoints (the last iteration always saves)")
    eval_every: int = _f(5, "iterations between held-out evaluations (0 = only at start and end)")
    eval_prompts: int = _f(16, "held-out prompts used for evaluation")
    eval_seeds: int = _f(4, "deterministic samples per held-out prompt (seeds fixed for the whole run)")


@dataclass(frozen=True)
class RewardConfig:
    weights: dict[str, float] = _f(
        {"toy_colour": 1.0, "toy_shape": 1.0, "toy_position": 1.0}, "reward name -> weight"
    )
    paths: dict[str, str] = _f(
        {}, "reward model -> local weights (folder or file; layouts in egrpo/rewards/), e.g. pickscore: /data/PickScore_v1"
    )
    runtime_env: str = _f(
        "", "YAML file with a Ray runtime_env for the reward servers (e.g. pip packages a reward needs); '' = the job's"
    )
    combine: Literal["per_reward", "weighted_sum"] = _f(
        "per_reward", "normalise each reward in its group then sum with weights, or normalise the weighted sum"
    )


@dataclass(frozen=True)
class DataConfig:
    prompts: str = _f("toy:train", "training prompts: .txt (one per line), .jsonl, .json (HPD), or toy:train")
    eval_prompts: str = _f("toy:eval", "held-out prompts, same forms")


@dataclass(frozen=True)
class RuntimeConfig:
    backend: Literal["ray", "local"] = _f("ray", "ray: actors on a Ray cluster; local: the in-process reference loop")
    address: str = _f("", "Ray address to join; empty = $RAY_ADDRESS if set, else start a local Ray")
    rollout_workers: int = _f(2, "RolloutWorker actors")
    reward_servers: int = _f(1, "RewardServer actors")
    learners: int = _f(1, "Learner actors (DeepSpeed data parallel ranks)")
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage 0-3")
    bf16: bool = _f(
        False, "bf16 learners (model.dtype=bfloat16): full weights under DeepSpeed bf16 with fp32 masters and gradient "
        "accumulation (ZeRO >= 1); LoRA adapters stay fp32"
    )
    rollout_cpus: float = _f(1.0, "CPUs per rollout worker (logical; a local Ray declares what is asked)")
    reward_cpus: float = _f(0.5, "CPUs per reward server")
    learner_cpus: float = _f(1.0, "CPUs per learner")
    rollout_gpus: float = _f(1.0, "GPUs per rollout worker, used when the cluster has GPUs")
    reward_gpus: float = _f(0.25, "GPUs per reward server, used when the cluster has GPUs")
    learner_gpus: float = _f(1.0, "GPUs per learner, used when the cluster has GPUs")
    placement: Literal["PACK", "SPREAD"] = _f("PACK", "placement-group strategy of each actor group")
    dashboard: bool = _f(True, "start the Ray dashboard with a local Ray")
    dashboard_host: str = _f("127.0.0.1", "address the local Ray dashboard binds to")
    weight_sync: Literal["auto", "object_store", "broadcast"] = _f(
        "auto", "how rollout workers get new weights; auto: object store for LoRA, broadcast for full weights"
    )
    sync_bucket_mb: float = _f(256.0, "broadcast weight sync: bucket size in MiB (one collective call per bucket)")
    sync_check: bool = _f(False, "after each weight sync, compare checksums of the received weights")
    overlap: bool = _f(False, "one-step-off: roll out iteration k+1 with the previous weights while learners train on k")
    timeout_s: float = _f(900.0, "longest wait for one actor call before the run stops with an error")


@dataclass(frozen=True)
class ChaosConfig:
    kill: Literal["", "rollout", "reward", "learner"] = _f("", "kill one actor of this role mid-iteration")
    at_iteration: int = _f(1, "iteration (0-based) at which the actor is killed")


@dataclass(frozen=True)
class Config:
    run: RunConfig = _f(RunConfig(), "")
    model: ModelConfig = _f(ModelConfig(), "")
    sampler: SamplerConfig = _f(SamplerConfig(), "")
    plan: PlanConfig = _f(PlanConfig(), "")
    grpo: GrpoConfig = _f(GrpoConfig(), "")
    mix: MixConfig = _f(MixConfig(), "")
    egrpo: EgrpoConfig = _f(EgrpoConfig(), "")
    aegpo: AegpoConfig = _f(AegpoConfig(), "")
    tree: TreeConfig = _f(TreeConfig(), "")
    train: TrainConfig = _f(TrainConfig(), "")
    rewards: RewardConfig = _f(RewardConfig(), "")
    data: DataConfig = _f(DataConfig(), "")
    runtime: RuntimeConfig = _f(RuntimeConfig(), "")
    chaos: ChaosConfig = _f(ChaosConfig(), "")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    @property
    def broadcast_weights(self) -> bool:
        """Whether full weights go to the rollout workers by torch.distributed broadcast (runtime.weight_sync)."""
        if self.runtime.weight_sync == "auto":
            return self.model.finetune == "full"
        return self.runtime.weight_sync == "broadcast"

    @property
    def egrpo_active_steps(self) -> int:
        return self.egrpo.active_steps or self.sampler.steps // 2

    @property
    def tree_plan(self) -> bool:
        """Whether the plan is a tree per prompt (egrpo.sampling.plans.tree_plan): branch, and AEGPO's tree reading."""
        return self.plan.method == "branch" or (self.plan.method == "aegpo" and self.aegpo.rollout == "tree")

    @property
    def aegpo_peak_steps(self) -> int:
        return self.aegpo.peak_steps or max(1, self.sampler.steps // 2)


# ----------------------------------------------------------------------------- building from dicts


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting YAML forms (list -> tuple, int -> float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _convert(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {_convert(k, key_tp, key): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}' (known in this section: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["a.b=3", "c.d=x"]` -> nested dict; values are parsed as YAML scalars (3 -> int, true -> bool)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or defaults when `path` is None), apply `--set` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return from_dict(_merge(data, parse_overrides(overrides)))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON dumps."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- value checks


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    """Values that have the right type but cannot work; each message names its key."""
    s, p, t = cfg.sampler, cfg.plan, cfg.train
    _require(s.steps >= 1, "sampler.steps", f"must be >= 1, got {s.steps}")
    _require(s.shift > 0, "sampler.shift", f"must be > 0, got {s.shift}")
    _require(s.noise_level > 0, "sampler.noise_level", f"must be > 0, got {s.noise_level}")
    _require(s.batch_size >= 1, "sampler.batch_size", f"must be >= 1, got {s.batch_size}")
    _require(s.decode_batch_size >= 0, "sampler.decode_batch_size", f"must be >= 0, got {s.decode_batch_size}")
    _require(p.group_size >= 2, "plan.group_size", f"must be >= 2 (advantages need a group), got {p.group_size}")
    _require(p.prompts_per_iteration >= 1, "plan.prompts_per_iteration", "must be >= 1")
    _require(cfg.egrpo.tau > 0, "egrpo.tau", f"must be > 0, got {cfg.egrpo.tau}")
    _require(
        0 <= cfg.egrpo.active_steps <= s.steps,
        "egrpo.active_steps",
        f"must be in [0, sampler.steps={s.steps}], got {cfg.egrpo.active_steps}",
    )
    _require(0 < cfg.grpo.train_fraction <= 1, "grpo.train_fraction", "must be in (0, 1]")
    if p.method == "mix":  # other methods never read mix.*: a short schedule need not fit its window
        _require(1 <= cfg.mix.window <= s.steps, "mix.window", f"must be in [1, sampler.steps={s.steps}]")
        _require(0 <= cfg.mix.start <= s.steps - cfg.mix.window, "mix.start", "window must fit inside the steps")
        _require(cfg.mix.move_every >= 1, "mix.move_every", "must be >= 1")
    a = cfg.aegpo
    if p.method == "aegpo":
        _require(a.g_min >= 2, "aegpo.g_min", f"must be >= 2 (advantages need a group), got {a.g_min}")
        _require(
            a.g_min <= p.group_size <= a.g_max, "aegpo.g_max",
            f"[aegpo.g_min, aegpo.g_max] = [{a.g_min}, {a.g_max}] must contain plan.group_size={p.group_size}",
        )
        _require(a.g_high >= 1 and a.g_low >= 1, "aegpo.g_high", "g_high and g_low must be >= 1")
        _require(a.alpha > 0, "aegpo.alpha", "must be > 0")
        _require(a.peaks >= 1, "aegpo.peaks", f"must be >= 1, got {a.peaks}")
        _require(0 <= a.peak_steps <= s.steps, "aegpo.peak_steps", f"must be in [0, sampler.steps={s.steps}]")
        _require(a.probe_rows >= 1 and a.probe_chunk >= 1, "aegpo.probe_rows", "probe_rows and probe_chunk must be >= 1")
    tr = cfg.tree
    if cfg.tree_plan:
        _require(tr.factor >= 2, "tree.factor", f"must be >= 2, got {tr.factor}")
        _require(all(0 <= n < s.steps for n in tr.split_points), "tree.split_points",
                 f"split steps must be in [0, sampler.steps={s.steps}), got {list(tr.split_points)}")
        _require(1 <= tr.splits <= s.steps, "tree.splits", f"must be in [1, sampler.steps={s.steps}]")
    _require(t.iterations >= 1, "train.iterations", f"must be >= 1, got {t.iterations}")
    _require(t.lr > 0, "train.lr", "must be > 0")
    _require(t.clip_range > 0, "train.clip_range", "must be > 0")
    _require(t.adv_clip > 0, "train.adv_clip", "must be > 0")
    _require(t.kl_beta >= 0, "train.kl_beta", "must be >= 0")
    _require(t.adv_std_ddof in (0, 1), "train.adv_std_ddof", f"must be 0 or 1, got {t.adv_std_ddof}")
    _require(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _require(t.epochs >= 1, "train.epochs", "must be >= 1")
    _require(t.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0")
    _require(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _require(t.eval_every >= 0, "train.eval_every", "must be >= 0")
    _require(t.eval_prompts >= 1, "train.eval_prompts", "must be >= 1")
    _require(t.eval_seeds >= 1, "train.eval_seeds", "must be >= 1")
    _require(cfg.model.lora_rank >= 1, "model.lora_rank", "must be >= 1")
    _require(cfg.model.cfg_scale >= 1, "model.cfg_scale", "must be >= 1 (1 = no classifier-free guidance)")
    _require(cfg.model.height >= 0 and cfg.model.width >= 0, "model.height", "must be >= 0")
    _require(bool(cfg.rewards.weights), "rewards.weights", "name at least one reward")
    from egrpo.rewards.base import REWARD_MODELS, REWARD_NAMES  # the registry imports no model code

    known = sorted(n for names in REWARD_NAMES.values() for n in names)
    for name in cfg.rewards.weights:
        _require(name in known, f"rewards.weights.{name}", f"unknown reward; known rewards: {', '.join(known)}")
    for model in cfg.rewards.paths:
        _require(model in REWARD_MODELS, f"rewards.paths.{model}",
                 f"unknown reward model; known models: {', '.join(sorted(REWARD_MODELS))}")
    _require(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", "must be a non-empty folder name")
    r = cfg.runtime
    for key in ("rollout_workers", "reward_servers", "learners"):
        _require(getattr(r, key) >= 1, f"runtime.{key}", "must be >= 1")
    for key in ("rollout_cpus", "reward_cpus", "learner_cpus", "rollout_gpus", "reward_gpus", "learner_gpus"):
        _require(getattr(r, key) >= 0, f"runtime.{key}", "must be >= 0")
    _require(0 <= r.zero_stage <= 3, "runtime.zero_stage", "must be 0, 1, 2 or 3")
    if r.bf16:
        _require(cfg.model.dtype == "bfloat16", "runtime.bf16", f"needs model.dtype=bfloat16, got {cfg.model.dtype}")
        _require(cfg.model.finetune == "lora" or r.zero_stage >= 1, "runtime.zero_stage",
                 "bf16 full fine-tuning needs ZeRO stage >= 1 (DeepSpeed accumulates its gradients in fp32 only there)")
    _require(r.timeout_s > 0, "runtime.timeout_s", "must be > 0")
    _require(r.sync_bucket_mb > 0, "runtime.sync_bucket_mb", "must be > 0")
    _require(cfg.chaos.at_iteration >= 0, "chaos.at_iteration", "must be >= 0")
