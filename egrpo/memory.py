"""Peak GPU memory of each role, from the real architectures on the meta device: `egrpo plan CONFIG --memory`.

Before a GPU is booked: will a rollout worker, a learner and a reward server fit, and what fills them? Nothing
is loaded and nothing needs a GPU.

Architecture
    `load_architecture(cfg)` reads the diffusers config files of `model.path` (model_index.json, then each
    component's config.json) when the folder has them: source "model.path". Otherwise it reads the configs egrpo
    ships for the models its recipes name, matched by the folder's name (egrpo/models/architectures/FLUX.1-dev,
    stable-diffusion-3.5-medium, Qwen-Image, FLUX.2-dev, FLUX.2-klein-4B, Z-Image-Turbo; the published config
    files, no weights; SOURCES.md says where each comes from): source "shipped". Every
    component is built from its config under `torch.device("meta")`, which allocates nothing, and its
    parameters are counted exactly. Reward models likewise, from `rewards.paths.<model>`'s config files (the
    layouts in egrpo/rewards/) or from architectures/rewards/<model>/ (the same layouts).

Notation
    GB = 1e9 bytes (the unit of GPU labels and of the recipes). An "80 GB" A100/H100 holds 80 GiB = 85.9e9
    bytes, so a peak compared with 80e9 keeps another ~7% for the caching allocator's fragmentation and NCCL.
    b: bytes per element of model.dtype. P: transformer parameters (B: its float buffers, e.g. SD3.5's 384 x 384
    positional table); T: trained parameters (P, or the LoRA adapter's L = sum over adapted linears of r (in +
    out)). K: runtime.learners; z: runtime.zero_stage. D: the transformer's width (heads x head_dim); F: its MLP
    width; C: input channels per image token. Per row (one sample): N_img = (H / s / 2) (W / s / 2) image tokens
    (s: the VAE's 8x, or the pixel-unshuffle factor of a VAE-less toy folder; 2x2 patches), N_txt =
    model.max_sequence_length (FLUX) or 77 + that (SD3: CLIP's tokens, then T5's), N = N_img + N_txt. CFG
    (SD3's model.cfg_scale > 1) doubles the rows of every transformer call, in sampling and in training.

Transformer activations (`transformer_activations`). Attention is SDPA (flash / memory-efficient kernels, also
on CPU), so no N x N matrix is ever stored. Each model family's file (egrpo/models/families/) gives its blocks'
counts (`memory_shape`), what each kind of block keeps (`saved_elements`) and its inference working set
(`inference_elements`); FLUX.1's and SD3's are below, Qwen-Image's, FLUX.2's and Z-Image's in their files'
docstrings, each checked against measured peaks of its tiny twin (tests/test_memory.py,
tests/test_family_*.py). Elements kept for the backward pass per token of one block, full fine-tuning, counted
from diffusers' block code and checked against measurement (tests/test_memory.py):
    FLUX double-stream / SD3 joint block:   13 D + 2 F + a      (a = 4 D + 2 r D with RMS-normed q/k, else 0)
    FLUX single-stream block:                9 D + 2 F + a
    SD3.5 dual-attention block, extra:       6 D + a            (image tokens only: the second attention)
    outside the blocks:                     (C + 3 D) per image token + J per text token (embedder inputs, the
                                            output norm and projection; J = joint_attention_dim)
where 2 F are the GELU's input and output, the rest D-wide norms, projections, q/k/v and the attention output,
and r = 2 in 16-bit dtypes (diffusers' RMSNorm keeps an fp32 copy of q and of k; 0 in fp32). LoRA saves less,
because frozen linears keep no input: x LORA_SAVED_FRACTION (0.6 for attention-only targets, 0.8 when MLPs are
adapted; measured 0.56-0.63, and 0.74-0.81 for blocks whose MLP is adapted). Gradient checkpointing keeps one
D-wide input per token per block, plus, during the backward pass, the recomputed saved set of the largest block.
Training activations of R rows (`transformer_activations`):
    saved     = R (sum over blocks of their saved sets + outside) b
                checkpointing: R ((blocks) N D + the largest block's saved set + outside) b
    backward  = max(R N F b: the MLP-wide gradient flowing back through a block,
                    the largest trained parameter's gradient (accumulation adds it to the existing one),
                    with kl_beta > 0: R x the inference working set of the reference policy's no-grad forward)
Inference working set of one transformer call (no autograd; what lives while the largest block runs), per row:
    FLUX: N (2 F + 7.5 D), N (2 F + 10 D) in 16-bit (RoPE and RMSNorm's fp32 temporaries)
    SD3:  max(N_img, N_txt) 2 F + 5 D N     (joint blocks run each stream's MLP separately)
Measured on CPU (fp32, `TensorMemoryTracker`), estimate / measured: 0.91-1.21 on tiny FLUX and SD3 models and
0.96-1.27 on an SD3.5-wide one with LoRA, rollout forwards and learner passes, with and without checkpointing.

Rollout worker (`RolloutWorker`: `load_policy(keep_reference=` the method needs probes `)`; runtime.rollout_gpus)
    transformer weights (P + B) b; reference copy (P + B) b under full fine-tuning with aegpo (E_ref; LoRA's
    reference is the adapter switched off: free); LoRA adapter 4 L (fp32); text encoders and VAE, params x b;
    prompt cache PROMPT_CACHE_SIZE x (N_txt J + pooled + FLUX's 3 N_txt position ids) b; CUDA context 0.5 GB;
    rollout latents: (2 per sample + 4 per trained step + steps + 1 per prompt) x N_img C x 4 (fp32), for the
    shard one worker runs (ceil(prompts / workers) prompts; per prompt G (grpo, mix), G x active steps (egrpo),
    aegpo.g_max (aegpo)). Then the largest of these phases:
      transformer call   inference working set x min(sampler.batch_size, samples) rows (x 2 with CFG)
      anchor pass        aegpo: its prompts' rows, working set + the entropy probe: per probed attention call
                         rows x (N D (4 + b) + 2 heads min(probe_chunk, probe_rows) N 4) (fp32 keys, the
                         recomputed keys and two softmax chunks, egrpo/entropy/attention.py)
      VAE decode         decode rows x H W x VAE_DECODE_TENSORS x c0 x b (c0: the decoder's last width, 128):
                         FLUX's VAE measured 1.35 GiB per 720 x 720 image in bf16 on CUDA (CPU: 6 instead of
                         11); decode rows = sampler.decode_batch_size, 0 = 4 (CUDA); with vae_tiling, H and W
                         are capped at the VAE's tile (its sample_size)
      weight sync        full-weight broadcast: one receive bucket of runtime.sync_bucket_mb MiB
Learner (`LearnerActor`: `load_policy(keep_reference=train.kl_beta > 0)`, rank 0, GPU: runtime.learner_gpus)
    transformer weights (P b) / K under ZeRO-3, + B b; reference copy (P + B) b with full fine-tuning and
    kl_beta > 0; LoRA adapter 4 L (/ K under ZeRO-3). DeepSpeed (egrpo/runtime/learner.py): full weights in bf16
    train under DeepSpeed bf16 (ZeRO >= 1) with fp32 master weights 4 T, fp32 Adam moments 8 T and fp32
    gradient accumulation 4 T; LoRA and fp32 weights train in their own dtype (ZeRO >= 1 still keeps an fp32
    master copy of its partition). Sharding over K: z >= 1 the master copy and the moments, z >= 2 also the
    gradients, z = 3 also the weights. Gradient reduction bucket: min(T, 5e8) elements x b (DeepSpeed's
    reduce_bucket_size; preallocated for z >= 2), all 5e8 under z = 3, which allocates it whole. Text encoders unless model.learner_text_encoders is false;
    the VAE; the prompt cache; CUDA context. Phases:
      load               before DeepSpeed partitions anything: the full weights, the reference copy, the text
                         encoders (freed afterwards when learners do without them), VAE, LoRA, CUDA context
      forward/backward   saved + backward activations of min(train.micro_batch_size, rows per rank) rows
                         (rows per rank = ceil(train.batch_size / K); x 2 with CFG); ZeRO-3 also gathers the
                         parameters of the running block plus DeepSpeed's 5e7-element prefetch bucket
      optimizer step     foreach AdamW's temporary, one fp32 copy of the partition it steps (ZeRO-3: at most
                         its 1e9-element sub-group)
      weight sync        full-weight broadcast from rank 0: one bucket; under ZeRO-3 three (the gathered
                         shards, the reassembled parameters and the flat send buffer)
      checkpoint         ZeRO-3 with full fine-tuning: every rank gathers all weights, (P b)(1 - 1/K) more
Reward server (`RewardServer`, GPU: runtime.reward_gpus x the GPU: servers share one)
    each reward model's weights in fp32 (as egrpo/rewards/ loads them); CUDA context; scoring one rollout shard
    (a worker's samples) per call, one model at a time: the images in float32 (n 3 H W 4), the resized pixels
    (2 n 3 S^2 4) and the model's working set n x max over its towers of tokens (2 F + 4 D) 4 (measured 12 D
    per token for CLIP's towers, F = 4 D).

A role's peak is its largest phase; its parts are that phase's and add up to the peak. A role fits when its
peak is at most its share of one GPU (runtime.<role>_gpus x --gpu-memory); a role without a GPU runs on the CPU.
"""

from __future__ import annotations

import functools
import json
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from egrpo.methods import branch_split_points, plan_method, tree_splits

if TYPE_CHECKING:
    from egrpo.config import Config

GB = 1e9
ARCHITECTURES = Path(__file__).parent / "models" / "architectures"
CUDA_CONTEXT_BYTES = int(0.5e9)
DEFAULT_GPU_MEMORY_GB = 80.0  # the recipes' GPUs (A100 / H100 80 GB)
VAE_DECODE_TENSORS = 11  # bytes per output pixel / (last decoder width x b): 1.35 GiB per 720x720 bf16 image
LORA_SAVED_FRACTION = {"attention": 0.6, "with_mlp": 0.8}  # LoRA's saved activations / full fine-tuning's
# DeepSpeed defaults (deepspeed/runtime/zero/config.py): what ZeRO keeps in flight
REDUCE_BUCKET_ELEMENTS = 500_000_000
PREFETCH_BUCKET_ELEMENTS = 50_000_000
SUB_GROUP_ELEMENTS = 1_000_000_000
ZERO3_SYNC_BUCKETS = 3  # ZeRO-3 broadcast on rank 0: gathered shards, reassembled parameters, flat send buffer

Source = Literal["model.path", "shipped", "rewards.paths", "none"]
# the configs egrpo ships (egrpo/models/architectures/, sources in its SOURCES.md), by model.path's folder name
_SHIPPED_MODELS = {name.lower(): name for name in ("FLUX.1-dev", "stable-diffusion-3.5-medium", "Qwen-Image",
                                                   "FLUX.2-dev", "FLUX.2-klein-4B", "Z-Image-Turbo")}


# ----------------------------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class TransformerShape:
    """What the memory formulas need of a transformer (module docstring), read off the model by its family's
    `memory_shape` (egrpo/models/families/)."""

    class_name: str
    family: str
    params: int
    buffer_elements: int  # float buffers: cast to model.dtype with the weights
    width: int  # D = heads x head_dim
    heads: int
    mlp_width: int  # F
    blocks: tuple[tuple[str, int], ...]  # (kind, count): the family's `saved_elements` has one entry per kind
    qk_rms_norm: bool
    token_channels: int  # C: input elements per image token
    text_width: int  # J: the text states' width as the transformer takes them
    pooled_dim: int  # 0 without a pooled text vector
    largest_block_params: int
    largest_parameter: int


@dataclass(frozen=True)
class ModelArchitecture:
    """The policy's components, as `FlowPolicy.from_pretrained` would load them, and the run's geometry."""

    source: Source
    folder: Path
    transformer: TransformerShape
    text_encoder_params: dict[str, int]
    vae_params: int
    vae_last_width: int  # the decoder's full-resolution width (block_out_channels[0]); 0 without a VAE
    vae_tile: int  # the VAE's sample_size: its tile in pixels under vae_tiling
    lora_params: int  # L for model.lora_targets and model.lora_rank
    height: int
    width: int
    image_tokens: int
    text_tokens: int


@dataclass(frozen=True)
class Tower:
    """One transformer of a reward model: tokens per image and widths, for its inference working set."""

    tokens: int
    width: int
    mlp_width: int


@dataclass(frozen=True)
class RewardArchitecture:
    model: str  # the registry's model name (egrpo.rewards.base)
    source: Source
    params: int
    towers: tuple[Tower, ...]
    image_size: int  # the square size the model's preprocessing resizes to


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters, float buffer elements) of a module; shared parameters count once."""
    buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    return sum(p.numel() for p in module.parameters()), buffers


@functools.cache
def _build_component(folder: Path, library: str, class_name: str) -> torch.nn.Module:
    """A diffusers or transformers component built from `folder`/config.json on the meta device (which holds no
    memory, so the architectures a process has sized stay cached)."""
    import diffusers
    import transformers

    with torch.device("meta"):
        if library == "diffusers":
            cls = getattr(diffusers, class_name)
            return cls.from_config(cls.load_config(folder))
        cls = getattr(transformers, class_name)
        return cls(cls.config_class.from_pretrained(folder))


def _architecture_folder(model_path: Path) -> tuple[Path, Source]:
    """model.path when it holds a diffusers pipeline's configs, else the shipped configs of that model."""
    if (model_path / "model_index.json").is_file():
        return model_path, "model.path"
    shipped = _SHIPPED_MODELS.get(model_path.name.lower())
    if shipped is None:
        from egrpo.config import ConfigError

        raise ConfigError(
            f"model.path: {model_path} has no model_index.json, and egrpo ships no architecture named "
            f"{model_path.name!r} (shipped: {', '.join(sorted(_SHIPPED_MODELS.values()))}); point model.path "
            "at a diffusers pipeline folder (its config files are enough, no weights are read)")
    return ARCHITECTURES / shipped, "shipped"


def _lora_params(transformer: torch.nn.Module, targets: list[str], rank: int) -> int:
    """Parameters of a rank-`rank` adapter on every linear whose name matches a target as peft matches it (the
    name itself, or ending in '.' + target): r (in + out) each."""
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    )


def transformer_shape(transformer: torch.nn.Module) -> TransformerShape:
    """The memory-relevant shape of a transformer of any supported family (meta or real)."""
    from egrpo.models.families import family_of_transformer

    try:
        family = family_of_transformer(transformer)
    except TypeError as e:
        from egrpo.config import ConfigError

        raise ConfigError(f"model.path: {e}") from None
    return family.memory_shape(transformer)


def load_architecture(cfg: Config) -> ModelArchitecture:
    """The policy's architecture (module docstring: which folder, which source) at the run's geometry:
    model.height / width / max_sequence_length, else the folder's egrpo.json, else the pipeline's defaults
    (1024 px; 512 T5 tokens), as `FlowPolicy.from_pretrained` resolves them."""
    from egrpo.models.families import policy_class
    from egrpo.models.tiny import EGRPO_SETTINGS_FILE
    from egrpo.trainer import resolve_model_path

    folder, source = _architecture_folder(resolve_model_path(cfg.model.path).expanduser())
    index = _read_json(folder / "model_index.json")
    components = {name: spec for name, spec in index.items()
                  if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None}
    if "transformer" not in components:
        from egrpo.config import ConfigError

        raise ConfigError(f"model.path: {folder / 'model_index.json'} names no transformer")
    transformer = _build_component(folder / "transformer", *components["transformer"])
    shape = transformer_shape(transformer)
    family = policy_class(shape.family)
    m = cfg.model
    lora = 0
    if m.finetune == "lora":
        lora = _lora_params(transformer, family.lora_modules(m.lora_targets), m.lora_rank)
    text_encoders = {name: count_parameters(_build_component(folder / name, *components[name]))[0]
                     for name in family.text_encoder_names if name in components}
    settings_file = folder / EGRPO_SETTINGS_FILE
    settings = _read_json(settings_file) if settings_file.is_file() else {}
    vae_params = vae_last_width = vae_tile = 0
    vae_config = None
    if "vae" in components:
        vae = _build_component(folder / "vae", *components["vae"])
        vae_config = dict(vae.config)
        # the decoder's full-resolution width (Qwen's video VAE calls it base_dim) and its tile side
        vae_params = count_parameters(vae)[0]
        vae_last_width = vae_config["block_out_channels"][0] if "block_out_channels" in vae_config \
            else vae_config["base_dim"]
        vae_tile = getattr(vae, "tile_sample_min_size", None) or vae.tile_sample_min_height
    scale = family.vae_scale(vae_config, settings)
    default_size = family.default_size(dict(transformer.config), scale)
    height = m.height or settings.get("height") or default_size
    width = m.width or settings.get("width") or default_size
    sequence = m.max_sequence_length or settings.get("max_sequence_length") or 512
    image_tokens, text_tokens = family.token_counts(dict(transformer.config), scale, height, width, sequence)
    return ModelArchitecture(
        source=source, folder=folder, transformer=shape, text_encoder_params=text_encoders,
        vae_params=vae_params, vae_last_width=vae_last_width, vae_tile=vae_tile, lora_params=lora,
        height=height, width=width, image_tokens=image_tokens, text_tokens=text_tokens,
    )


# Each reward model's config files, relative to its rewards.paths folder (the layouts of egrpo/rewards/)
_REWARD_CONFIG_FILES = {"clip": "config.json", "pickscore": "config.json", "hpsv2": "clip/config.json",
                        "aesthetic": "clip/config.json", "imagereward": "med_config.json"}


def _clip_towers(config, vision_only: bool = False) -> tuple[Tower, ...]:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    towers = [Tower(patches + 1, vision.hidden_size, vision.intermediate_size)]  # + the class token
    if not vision_only:
        text = config.text_config
        towers.append(Tower(text.max_position_embeddings, text.hidden_size, text.intermediate_size))
    return tuple(towers)


def reward_architecture(model: str, path: str | None) -> RewardArchitecture:
    """A registered reward model's size, built on the meta device from its config files at `path` (its
    rewards.paths entry) when they are there, else from the shipped ones. ImageReward's ViT is always the
    shipped ViT-L/16 (the loader reads it off the checkpoint's shapes, and that is the only one released)."""
    if model == "toy":
        return RewardArchitecture(model, "none", 0, (), 0)
    from transformers import BlipTextModel, BlipVisionConfig, BlipVisionModel, CLIPConfig, CLIPModel

    from egrpo.rewards.aesthetic import ScoreHead
    from egrpo.rewards.imagereward import MAX_PROMPT_TOKENS, text_config_from_med

    given = Path(path).expanduser() if path else None
    source: Source = "rewards.paths" if given and (given / _REWARD_CONFIG_FILES[model]).is_file() else "shipped"
    folder = given if source == "rewards.paths" else ARCHITECTURES / "rewards" / model
    config_file = folder / _REWARD_CONFIG_FILES[model]
    with torch.device("meta"):
        if model == "imagereward":
            vision_file = ARCHITECTURES / "rewards" / model / "vision_config.json"
            vision_config = BlipVisionConfig(**_read_json(vision_file))
            text_config = text_config_from_med(_read_json(config_file), vision_config.hidden_size)
            parts = [BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False),
                     ScoreHead(text_config.hidden_size)]
            patches = (vision_config.image_size // vision_config.patch_size) ** 2 + 1
            towers = (Tower(patches, vision_config.hidden_size, vision_config.intermediate_size),
                      Tower(MAX_PROMPT_TOKENS, text_config.hidden_size, text_config.intermediate_size))
            image_size = vision_config.image_size
        else:
            config = CLIPConfig.from_pretrained(config_file.parent)
            clip = CLIPModel(config)
            if model == "aesthetic":  # only the vision tower, its projection and the score head are loaded
                parts = [clip.vision_model, clip.visual_projection, ScoreHead(config.projection_dim)]
            else:
                parts = [clip]
            towers = _clip_towers(config, vision_only=model == "aesthetic")
            image_size = config.vision_config.image_size
    return RewardArchitecture(model, source, sum(count_parameters(p)[0] for p in parts), towers, image_size)


def reward_architectures(cfg: Config) -> list[RewardArchitecture]:
    """The reward models the configured rewards need, once each, in `build_reward_models`' order."""
    from egrpo.rewards.base import reward_model_for

    models = dict.fromkeys(reward_model_for(name) for name in cfg.rewards.weights)
    return [reward_architecture(model, cfg.rewards.paths.get(model)) for model in models]


# ------------------------------------------------------------------------------------ activation formulas


def fp32_copy_units(dtype_bytes: int) -> float:
    """r: extra b-sized units of an fp32 copy of a b-byte tensor (2 in 16-bit; 0 in fp32: no copy there)."""
    return 4 / dtype_bytes if dtype_bytes < 4 else 0.0


def block_saved_elements(t: TransformerShape, image_tokens: int, text_tokens: int,
                         dtype_bytes: int) -> dict[str, float]:
    """Elements each kind of block keeps for backward, per row, under full fine-tuning (module docstring)."""
    from egrpo.models.families import policy_class

    return policy_class(t.family).saved_elements(t, image_tokens, text_tokens, dtype_bytes)


def inference_working_set(t: TransformerShape, image_tokens: int, text_tokens: int, dtype_bytes: int) -> float:
    """Bytes alive in one row's transformer call without autograd, at its largest block (module docstring)."""
    from egrpo.models.families import policy_class

    return policy_class(t.family).inference_elements(t, image_tokens, text_tokens, dtype_bytes) * dtype_bytes


def lora_saved_fraction(t: TransformerShape, finetune: str, lora_targets: tuple[str, ...]) -> float:
    """Saved activations relative to full fine-tuning: 1 for full, LORA_SAVED_FRACTION for an adapter (with MLPs
    when it adapts anything beyond the family's attention preset)."""
    from egrpo.models.families import policy_class

    if finetune == "full":
        return 1.0
    family = policy_class(t.family)
    beyond_attention = set(family.lora_modules(lora_targets)) - set(family.lora_modules(("attention",)))
    return LORA_SAVED_FRACTION["with_mlp" if beyond_attention else "attention"]


def transformer_activations(
    t: TransformerShape, *, image_tokens: int, text_tokens: int, rows: int, dtype_bytes: int,
    checkpointing: bool, saved_fraction: float = 1.0, largest_gradient_bytes: float = 0.0,
    reference_forward: bool = False,
) -> dict[str, float]:
    """Training activations of one forward/backward pass over `rows` rows, in bytes: what the forward pass keeps
    for backward ("saved") and the most that comes on top while it is kept ("backward": the backward pass's
    working set, or the largest trained parameter's gradient, or with `reference_forward` the no-grad forward of
    the KL term's reference policy). Module docstring."""
    per_kind = block_saved_elements(t, image_tokens, text_tokens, dtype_bytes)
    if checkpointing:
        largest_block = max(per_kind[kind] for kind, count in t.blocks if count)
        inputs = sum(count for _, count in t.blocks) * (image_tokens + text_tokens) * t.width
        block_elements = inputs + saved_fraction * largest_block
    else:
        block_elements = saved_fraction * sum(per_kind[kind] * count for kind, count in t.blocks)
    saved = rows * (block_elements + per_kind["outside"]) * dtype_bytes
    backward = max(rows * (image_tokens + text_tokens) * t.mlp_width * dtype_bytes, largest_gradient_bytes)
    if reference_forward:
        backward = max(backward, rows * inference_working_set(t, image_tokens, text_tokens, dtype_bytes))
    return {"saved": saved, "backward": backward}


def vae_decode_bytes(arch: ModelArchitecture, images: int, dtype_bytes: int, tiling: bool) -> float:
    """The VAE decoder's peak for `images` images per call (module docstring); 0 for pixel latents."""
    height, width = arch.height, arch.width
    if tiling:
        height, width = min(height, arch.vae_tile), min(width, arch.vae_tile)
    return images * height * width * VAE_DECODE_TENSORS * arch.vae_last_width * dtype_bytes


def reward_working_set(reward: RewardArchitecture, images: int, height: int, width: int) -> dict[str, float]:
    """One scoring call's transient bytes on the reward server, fp32 (module docstring)."""
    if not reward.towers:
        return {}
    tower = max(t.tokens * (2 * t.mlp_width + 4 * t.width) for t in reward.towers)
    return {"images (float32)": images * 3 * height * width * 4,
            "resized pixels": 2 * images * 3 * reward.image_size**2 * 4,
            f"{reward.model} activations": images * tower * 4}


# ------------------------------------------------------------------------------------------------------ roles


@dataclass(frozen=True)
class RoleMemory:
    """A role's memory in each of its phases: every part alive then, in bytes. The peak is the largest phase."""

    role: Literal["rollout", "learner", "reward"]
    gpus: float  # the role's share of one GPU (runtime.<role>_gpus); 0: it runs on the CPU
    phases: dict[str, dict[str, float]]

    def total(self, phase: str) -> float:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak(self) -> float:
        return self.total(self.peak_phase)

    @property
    def parts(self) -> dict[str, float]:
        """The peak phase's parts without the empty ones; they add up to `peak`."""
        return {name: value for name, value in self.phases[self.peak_phase].items() if value > 0}

    def capacity(self, gpu_memory_gb: float) -> float:
        return self.gpus * gpu_memory_gb * GB

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.gpus == 0 or self.peak <= self.capacity(gpu_memory_gb)


@dataclass(frozen=True)
class Workload:
    """One actor's share of an iteration, from the plan's shape (upper bounds where it depends on data)."""

    prompts_per_worker: int
    samples_per_worker: int  # also the images one reward call scores (a rollout shard)
    trained_per_worker: int
    learner_rows: int  # rows of one learner forward/backward, CFG's doubling included


def _cfg_factor(cfg: Config) -> int:
    return 2 if cfg.model.cfg_scale != 1.0 else 1


def _dtype_bytes(cfg: Config) -> int:
    return getattr(torch, cfg.model.dtype).itemsize


def workload(cfg: Config) -> Workload:
    """Per rollout worker: ceil(prompts / workers) prompts, each with G samples (grpo, mix), G x active steps
    (egrpo), up to aegpo.g_max (aegpo), or a tree's leaves (branch, aegpo's tree: at most 2 trained edges per
    leaf with ODE between splits, one per step with SDE), or its share of the held-out samples if more. Per
    learner: the micro-batch, at most a rank's rows of a minibatch (ceil(rows / learners), where a minibatch
    holds train.batch_size rows or up to one unit more: rows that share an input stay together)."""
    p, r, steps = cfg.plan, cfg.runtime, cfg.sampler.steps
    prompts = math.ceil(p.prompts_per_iteration / r.rollout_workers)
    tree_edges = 2 if cfg.tree.between == "ode" else steps
    branch_leaves = cfg.tree.factor ** len(branch_split_points(cfg))
    aegpo_tree_leaves = cfg.tree.factor ** tree_splits(cfg, cfg.aegpo.g_max)
    per_prompt, trained_per_sample, unit = {
        "grpo": (p.group_size, max(1, round(cfg.grpo.train_fraction * steps)), p.group_size),
        "mix": (p.group_size, cfg.mix.window, p.group_size),
        "egrpo": (p.group_size * cfg.egrpo_active_steps, 1, p.group_size),
        "aegpo": ((aegpo_tree_leaves, tree_edges, cfg.tree.factor) if cfg.tree_plan
                  else (cfg.aegpo.g_max, cfg.aegpo.peaks, cfg.aegpo.g_max)),
        "branch": (branch_leaves, tree_edges, cfg.tree.factor),
    }[p.method]
    held_out = math.ceil(cfg.train.eval_prompts * cfg.train.eval_seeds / r.rollout_workers)
    rows_per_rank = math.ceil((cfg.train.batch_size + unit - 1) / r.learners)
    micro = min(cfg.train.micro_batch_size or rows_per_rank, rows_per_rank)
    return Workload(prompts, max(prompts * per_prompt, held_out), prompts * per_prompt * trained_per_sample,
                    micro * _cfg_factor(cfg))


def _prompt_bytes(arch: ModelArchitecture, dtype_bytes: int) -> float:
    """One cached prompt's conditioning (egrpo.models.policy), as its family counts it."""
    from egrpo.models.families import policy_class

    return policy_class(arch.transformer.family).prompt_elements(arch.transformer, arch.text_tokens) * dtype_bytes


def rollout_memory(cfg: Config, arch: ModelArchitecture, work: Workload) -> RoleMemory:
    """A rollout worker (module docstring)."""
    from egrpo.models.policy import PROMPT_CACHE_SIZE
    from egrpo.trainer import resolve_decode_batch_size

    t, m, b = arch.transformer, cfg.model, _dtype_bytes(cfg)
    weights = (t.params + t.buffer_elements) * b
    latent = arch.image_tokens * t.token_channels * 4
    held = {
        "transformer weights": weights,
        "reference copy": weights if m.finetune == "full" and plan_method(cfg).needs_probes else 0,
        "LoRA adapter (fp32)": 4 * arch.lora_params,
        "text encoders": sum(arch.text_encoder_params.values()) * b,
        "VAE": arch.vae_params * b,
        "prompt cache": PROMPT_CACHE_SIZE * _prompt_bytes(arch, b),
        "CUDA context": CUDA_CONTEXT_BYTES,
        "rollout latents": latent * (2 * work.samples_per_worker + 4 * work.trained_per_worker
                                     + work.prompts_per_worker * (cfg.sampler.steps + 1)),
    }
    per_row = inference_working_set(t, arch.image_tokens, arch.text_tokens, b)
    call_rows = min(cfg.sampler.batch_size, work.samples_per_worker) * _cfg_factor(cfg)
    phases = {"transformer call": {**held, "activations (one call)": call_rows * per_row}}
    if plan_method(cfg).needs_probes:
        a, n = cfg.aegpo, arch.image_tokens + arch.text_tokens
        probe = n * t.width * (4 + b) + 2 * t.heads * min(a.probe_chunk, a.probe_rows) * n * 4
        anchor_rows = min(cfg.sampler.batch_size, work.prompts_per_worker) * _cfg_factor(cfg)
        phases["anchor pass with entropy probes"] = {**held, "activations (one call)": anchor_rows * per_row,
                                                     "entropy probe": anchor_rows * probe}
    s = cfg.sampler  # the decode batch as a CUDA rollout worker resolves it
    decode_rows = min(resolve_decode_batch_size(s.decode_batch_size, s.batch_size, torch.device("cuda")),
                      work.samples_per_worker)
    decode = vae_decode_bytes(arch, decode_rows, b, cfg.sampler.vae_tiling)
    phases["VAE decode"] = {**held, "VAE decode": decode}
    if cfg.broadcast_weights:
        phases["weight sync"] = {**held, "weight-sync bucket": cfg.runtime.sync_bucket_mb * 2**20}
    return RoleMemory("rollout", cfg.runtime.rollout_gpus, phases)


def learner_memory(cfg: Config, arch: ModelArchitecture, work: Workload) -> RoleMemory:
    """Learner rank 0, the one that also sends the weights (module docstring)."""
    from egrpo.models.policy import PROMPT_CACHE_SIZE

    t, m, r, b = arch.transformer, cfg.model, cfg.runtime, _dtype_bytes(cfg)
    full, zero, ranks = m.finetune == "full", r.zero_stage, r.learners
    trained = t.params if full else arch.lora_params
    param_bytes = b if full else 4  # LoRA adapters are fp32 (egrpo.models.policy.setup_finetune)
    mixed = r.bf16 and full and b == 2  # DeepSpeed bf16: fp32 masters, fp32 gradient accumulation
    fp32_optimizer = mixed or zero >= 1  # the optimiser steps fp32 copies (ZeRO partitions, bf16 masters)
    optimizer_share = ranks if zero >= 1 else 1
    full_weights = (t.params + t.buffer_elements) * b
    # ZeRO 3 preallocates the whole reduce bucket however small the model (deepspeed stage3.py, "IPG");
    # ZeRO 2's grows to at most the trained parameters
    reduction_bucket = (REDUCE_BUCKET_ELEMENTS if zero == 3 else min(trained, REDUCE_BUCKET_ELEMENTS)) * param_bytes
    text_encoders = sum(arch.text_encoder_params.values()) * b
    reference = full_weights if full and cfg.train.kl_beta > 0 else 0
    held = {
        "transformer weights": t.params * b / (ranks if zero == 3 else 1) + t.buffer_elements * b,
        "reference copy": reference,
        "LoRA adapter (fp32)": 4 * arch.lora_params / (ranks if zero == 3 else 1),
        "fp32 master weights": 4 * trained / optimizer_share if fp32_optimizer else 0,
        "Adam moments": 2 * (4 if fp32_optimizer else param_bytes) * trained / optimizer_share,
        "gradients": (4 if mixed else param_bytes) * trained / (ranks if zero >= 2 else 1),
        "gradient reduction bucket": reduction_bucket if zero >= 2 else 0,
        "text encoders": text_encoders if m.learner_text_encoders else 0,
        "VAE": arch.vae_params * b,
        "prompt cache": PROMPT_CACHE_SIZE * _prompt_bytes(arch, b),
        "CUDA context": CUDA_CONTEXT_BYTES,
    }
    activations = transformer_activations(
        t, image_tokens=arch.image_tokens, text_tokens=arch.text_tokens, rows=work.learner_rows, dtype_bytes=b,
        checkpointing=m.gradient_checkpointing,
        saved_fraction=lora_saved_fraction(t, m.finetune, m.lora_targets),
        largest_gradient_bytes=t.largest_parameter * b if full else 0, reference_forward=cfg.train.kl_beta > 0)
    gathered = (t.largest_block_params + PREFETCH_BUCKET_ELEMENTS) * b if zero == 3 else 0
    step_elements = trained / optimizer_share
    if zero == 3:
        step_elements = min(step_elements, SUB_GROUP_ELEMENTS)
    phases = {
        "load": {"transformer weights": full_weights, "reference copy": reference,
                 "LoRA adapter (fp32)": 4 * arch.lora_params, "text encoders": text_encoders,
                 "VAE": held["VAE"], "CUDA context": CUDA_CONTEXT_BYTES},
        "forward/backward": {
            **held,
            "activations (saved for backward)": activations["saved"],
            "backward working set": activations["backward"],
            "ZeRO-3 gathered parameters": gathered,
            "gradient reduction bucket": reduction_bucket,
        },
        "optimizer step": {**held, "AdamW step temporaries (fp32)": 4 * step_elements},
    }
    if cfg.broadcast_weights:
        buckets = ZERO3_SYNC_BUCKETS if zero == 3 else 1
        phases["weight sync"] = {**held, "weight-sync buckets": buckets * r.sync_bucket_mb * 2**20}
    if zero == 3 and full:
        phases["checkpoint"] = {**held, "gathered weights (ZeRO-3 checkpoint)": t.params * b * (1 - 1 / ranks)}
    return RoleMemory("learner", r.learner_gpus, phases)


def reward_memory(cfg: Config, rewards: list[RewardArchitecture], arch: ModelArchitecture,
                  work: Workload) -> RoleMemory:
    """A reward server scoring one rollout shard per call (module docstring)."""
    held = {f"{reward.model} weights (fp32)": reward.params * 4 for reward in rewards}
    held["CUDA context"] = CUDA_CONTEXT_BYTES
    phases = {f"score with {reward.model}": {**held, **reward_working_set(reward, work.samples_per_worker,
                                                                          arch.height, arch.width)}
              for reward in rewards}
    return RoleMemory("reward", cfg.runtime.reward_gpus, phases)


# ------------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class MemoryPlan:
    config: Config
    architecture: ModelArchitecture
    rewards: tuple[RewardArchitecture, ...]
    roles: tuple[RoleMemory, ...]
    gpu_memory_gb: float

    def role(self, name: str) -> RoleMemory:
        return next(r for r in self.roles if r.role == name)

    def to_json(self) -> dict[str, Any]:
        """{"model": ..., "roles": {role: {"peak_gb", "parts"}}, "fits": {role: bool}, "gpu_memory_gb"}."""
        a, t = self.architecture, self.architecture.transformer
        model = {
            "transformer_params": t.params, "source": a.source, "architecture": str(a.folder),
            "transformer_class": t.class_name, "lora_params": a.lora_params,
            "text_encoder_params": a.text_encoder_params, "vae_params": a.vae_params,
            "height": a.height, "width": a.width, "image_tokens": a.image_tokens, "text_tokens": a.text_tokens,
            "dtype": self.config.model.dtype,
            "rewards": {r.model: {"params": r.params, "source": r.source} for r in self.rewards},
        }
        roles = {}
        for r in self.roles:
            parts = {name: round(value / GB, 6) for name, value in r.parts.items()}
            roles[r.role] = {"peak_gb": round(sum(parts.values()), 6), "parts": parts}
        return {
            "model": model,
            "roles": roles,
            "fits": {r.role: r.fits(self.gpu_memory_gb) for r in self.roles},
            "gpu_memory_gb": self.gpu_memory_gb,
        }

    def format(self) -> str:
        """The readable table: per role its peak phase's parts, a verdict, the other phases' totals."""
        cfg, a, t = self.config, self.architecture, self.architecture.transformer
        m, r = cfg.model, cfg.runtime
        where = f"model.path {a.folder}"
        if a.source == "shipped":
            where = f"shipped architecture {a.folder.name} ({m.path} has no model_index.json)"
        training = (f"LoRA r={m.lora_rank} ({_count_text(a.lora_params)} trained)" if m.finetune == "lora"
                    else "full fine-tuning")
        lines = [
            f"Memory plan of {cfg.run.name} on {self.gpu_memory_gb:g} GB GPUs (GB = 1e9 bytes)",
            f"model: {t.class_name}, {_count_text(t.params)} parameters, from the {where}",
            f"  {a.height}x{a.width}: {a.image_tokens} image + {a.text_tokens} text tokens; {m.dtype}, "
            f"{training}, "
            f"gradient checkpointing {'on' if m.gradient_checkpointing else 'off'}, ZeRO-{r.zero_stage} over "
            f"{r.learners} learner{'s' if r.learners > 1 else ''}",
        ]
        if self.rewards:
            rewards = (f"{x.model} {_count_text(x.params)} ({x.source})" for x in self.rewards)
            lines.append("rewards: " + ", ".join(rewards))
        counts = {"rollout": r.rollout_workers, "learner": r.learners, "reward": r.reward_servers}
        titles = {"rollout": "rollout worker", "learner": "learner rank 0", "reward": "reward server"}
        for role in self.roles:
            lines += ["", f"{titles[role.role]} (x{counts[role.role]}, {role.gpus:g} GPU each), peak in "
                          f"'{role.peak_phase}':"]
            lines += [f"  {name:<40} {value / GB:8.2f} GB" for name, value in role.parts.items()]
            lines.append(f"  {'peak':<40} {role.peak / GB:8.2f} GB")
            if role.gpus == 0:
                lines.append("  no GPU: runs on the CPU")
            else:
                capacity = role.capacity(self.gpu_memory_gb)
                verdict = "fits" if role.fits(self.gpu_memory_gb) else "DOES NOT FIT"
                lines.append(f"  {verdict}: {role.peak / GB:.1f} of {capacity / GB:g} GB "
                             f"({100 * (1 - role.peak / capacity):.0f}% free)")
            others = [f"{p} {role.total(p) / GB:.1f}" for p in role.phases if p != role.peak_phase]
            if others:
                lines.append("  other phases (GB): " + ", ".join(others))
        return "\n".join(lines)


def _count_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def memory_plan(cfg: Config, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB) -> MemoryPlan:
    """Every role's memory for the run `cfg` describes, on GPUs of `gpu_memory_gb` GB."""
    arch = load_architecture(cfg)
    rewards = reward_architectures(cfg)
    work = workload(cfg)
    roles = (rollout_memory(cfg, arch, work), learner_memory(cfg, arch, work),
             reward_memory(cfg, rewards, arch, work))
    return MemoryPlan(cfg, arch, tuple(rewards), roles, gpu_memory_gb)


# -------------------------------------------------------------------------------------------------- measuring


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created inside the block: how the formulas above were
    checked on CPU, where torch keeps no allocator statistics (tests/test_memory.py). Storages of the tensors
    in `existing` (weights, inputs, gradients from before) are not counted, views of them neither."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live_bytes = self.peak_bytes = 0
        self._known = {t.untyped_storage()._cdata for t in existing}
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self._known and key not in self._sizes:
                    self._sizes[key] = storage.nbytes()
                    self.live_bytes += storage.nbytes()
                    self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key)


def measured_pass_peak(transformer: torch.nn.Module, inputs: dict[str, Any], training: bool,
                       state: Iterable[torch.Tensor] = ()) -> int:
    """Peak bytes of one no-grad forward or one forward + backward pass of `transformer(**inputs)` above what
    existed before it: weights, buffers, `state` (tensors a model keeps outside its buffers, e.g. Qwen-Image's
    RoPE tables), the inputs (tensors or lists of them) and the gradients of a previous micro-batch (created
    here as zeros, so the pass accumulates, as a learner's second micro-batch does). The training loss is the
    mean square of the output (a list of outputs, as Z-Image returns, is stacked). What the tests compare each
    family's estimates with."""
    trained = [p for p in transformer.parameters() if p.requires_grad]
    if training:
        for p in trained:
            p.grad = torch.zeros_like(p)
    existing = [*transformer.parameters(), *transformer.buffers(), *state, *[p.grad for p in trained if training],
                *[t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)]]
    with TensorMemoryTracker(existing) as tracker:
        if training:
            out = transformer(**inputs)[0]
            (torch.stack(out) if isinstance(out, list) else out).float().square().mean().backward()
        else:
            with torch.no_grad():
                transformer(**inputs)
    transformer.zero_grad(set_to_none=True)
    return tracker.peak_bytes
