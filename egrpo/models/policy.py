"""The policy adapter: a diffusers text-to-image pipeline seen as the velocity field v_theta(x, sigma, c).

Samplers, rollouts and losses only ever call `encode_prompts`, `initial_noise`, `velocity` and `decode`, on
latents in one fixed per-sample shape (`latent_shape`), so the model family stays a detail of the policy.
`FlowPolicy` holds what every family shares (the prompt cache, classifier-free guidance, finetuning, the
reference policy, saving); each family's file in egrpo/models/families/ subclasses it and fills in the hooks
below, and nothing else differs between families:

    class attributes   family, text_encoder_names, lora_presets, default_schedule, supports_cfg, tiny_settings
    latents            _latent_shapes (one sample's noise as the pipeline draws it, and the sampler's shape),
                       _pack / _unpack (between the two), _vae_decode / _vae_encode (the VAE and its scaling)
    conditioning       _encode (the pipeline's own prompt encoding, batch-first, one shape for every prompt)
    transformer        _call (one conditional transformer call: the family's timestep convention, guidance
                       embedding, position ids, masks), _guide (how CFG combines the two halves)
    class methods      vae_scale, default_size, tiny_pipeline, pipeline_sigmas (its scheduler), the entropy probe's
                       attention_modules / check_probe_support / probe_call / probe_query_key, and the memory
                       plan's memory_shape / saved_elements / inference_elements / token_counts /
                       prompt_elements

`FlowPolicy.from_pretrained(path)` reads model_index.json and builds the family's subclass.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import diffusers
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers.utils import logging as transformers_logging

from egrpo.models.families import PIPELINE_FAMILIES, policy_class
from egrpo.models.folder import check_pipeline_folder
from egrpo.models.tiny import EGRPO_SETTINGS_FILE

if TYPE_CHECKING:
    from egrpo.memory import TransformerShape

FinetuneMode = Literal["lora", "full"]
PROMPT_CACHE_SIZE = 256  # prompts whose conditioning a policy keeps (FLUX: 4 MB each)

# The attention projections of a double-stream (MMDiT) block, image and text streams, under diffusers' names.
# Families whose blocks name them differently define their own "attention" preset.
ATTENTION_PROJECTIONS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)


def shift_mu(scheduler_config: dict[str, Any], image_tokens: int, max_shift: float = 1.15) -> float:
    """The pipelines' mu = calculate_shift(image tokens): linear in the token count between the scheduler config's
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), with the pipelines' fallbacks 256, 4096,
    0.5 and `max_shift` (1.15; SD3's 1.16) for missing keys. FLUX, Qwen-Image, SD3 and Z-Image share it."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler_config
    return calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", max_shift))


class FlowPolicy:
    """A flow-matching text-to-image model as an RL policy (see the module docstring). Construct a family's
    subclass through `from_pretrained`."""

    family: ClassVar[str]
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # `model.lora_targets` may name these presets; every family has "attention" (the default) and one named
    # after itself (attention and MLPs). Any other entry is a module-name suffix, as peft reads it.
    lora_presets: ClassVar[dict[str, tuple[str, ...]]]
    # `sampler.schedule: family` resolves to this: "shift" (egrpo's shift(1 - i/T)) or "pipeline" (`pipeline_sigmas`)
    default_schedule: ClassVar[Literal["shift", "pipeline"]]
    supports_cfg: ClassVar[bool] = False  # whether cfg_scale > 1 (true classifier-free guidance) applies
    # what `egrpo tiny` writes into egrpo.json for the family's tiny twin
    tiny_settings: ClassVar[dict[str, Any]] = {"height": 32, "width": 32, "max_sequence_length": 16}

    def __init__(
        self,
        pipe: DiffusionPipeline,
        *,
        height: int,
        width: int,
        guidance: float = 3.5,
        max_sequence_length: int = 512,
        cfg_scale: float = 1.0,
        settings: dict[str, Any] | None = None,
    ) -> None:
        """Wrap a loaded pipeline of this family; most callers want `from_pretrained`. `cfg_scale` > 1 turns on
        classifier-free guidance where the family has it (`supports_cfg`); `guidance` is the distilled guidance
        of families with a guidance embedding. `settings` is the folder's egrpo.json."""
        if cfg_scale != 1.0 and not self.supports_cfg:
            raise ValueError(f"classifier-free guidance (cfg_scale={cfg_scale}) is not used by {self.family}; "
                             "its guidance, if any, is distilled into `guidance`")
        self.pipe = pipe
        self.transformer: torch.nn.Module = pipe.transformer
        self.device: torch.device = pipe.transformer.device
        self.dtype: torch.dtype = pipe.transformer.dtype
        self.height, self.width = height, width
        self.guidance = guidance
        self.cfg_scale = cfg_scale
        self.max_sequence_length = max_sequence_length
        self.settings = settings or {}
        self._noise_shape, self.latent_shape = self._latent_shapes()

        # Everything is frozen and in eval mode (no dropout: log-prob ratios must be exactly 1 on replay)
        # until setup_finetune makes part of the transformer trainable.
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False).eval()
        self.finetune_mode: FinetuneMode | None = None
        self._reference_transformer: torch.nn.Module | None = None
        self._use_reference = False
        self._prompt_cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        height: int = 0,
        width: int = 0,
        guidance: float = 3.5,
        max_sequence_length: int = 0,
        cfg_scale: float = 1.0,
    ) -> FlowPolicy:
        """Load a diffusers pipeline folder of any supported family from local disk (never the hub), as that
        family's subclass.

        Size 0 means: the folder's `egrpo.json` if it has one, else the family's `default_size`;
        max_sequence_length 0 likewise, else 512. Components saved as null (e.g. a missing VAE) are passed to
        diffusers as None explicitly, which is the only way its `from_pretrained` accepts such a folder.
        """
        path = Path(path)
        index = check_pipeline_folder(path)  # the CLI's pre-flight check: one line naming a missing file
        family = policy_class(PIPELINE_FAMILIES[index["_class_name"]])
        if cls is not FlowPolicy and not issubclass(family, cls):
            raise ValueError(f"{path} holds a {index['_class_name']}, not a {cls.family} pipeline")
        null_components = {name: None for name, spec in index.items() if spec == [None, None]}
        diffusers_logging.disable_progress_bar()  # egrpo shows its own progress; N actors x 6 bars is noise
        transformers_logging.disable_progress_bar()
        pipe = getattr(diffusers, index["_class_name"]).from_pretrained(path, dtype=dtype, local_files_only=True, **null_components)
        pipe.to(device)

        settings_file = path / EGRPO_SETTINGS_FILE
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        vae = getattr(pipe, "vae", None)
        vae_scale = family.vae_scale(None if vae is None else dict(vae.config), settings)
        default_size = family.default_size(dict(pipe.transformer.config), vae_scale)
        return family(
            pipe,
            height=height or settings.get("height") or default_size,
            width=width or settings.get("width") or default_size,
            guidance=guidance,
            max_sequence_length=max_sequence_length or settings.get("max_sequence_length") or 512,
            cfg_scale=cfg_scale,
            settings=settings,
        )

    # --------------------------------------------------------------------------------- the family's hooks

    @classmethod
    def vae_scale(cls, vae_config: dict[str, Any] | None, settings: dict[str, Any]) -> int:
        """Image pixels per latent pixel along a side, from the VAE's config (here an AutoencoderKL's: each
        block after the first halves the resolution)."""
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    @classmethod
    def default_size(cls, transformer_config: dict[str, Any], vae_scale: int) -> int:
        """The image side the family's pipeline samples at when given no height or width."""
        raise NotImplementedError

    def _latent_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(one sample's noise as the pipeline's prepare_latents draws it, one sample's latent as the sampler
        and the transformer see it); refuses image sizes the pipeline cannot make."""
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The transformer's conditioning of `prompts`, from the pipeline's own prompt encoding: batch-first,
        and every prompt's tensors the same shape (pad variable-length text to max_sequence_length with a mask,
        and let `_call` trim it), so prompts may be cached, stacked and concatenated one by one."""
        raise NotImplementedError

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Noise-shaped (B, *noise shape) latents to the sampler's (B, *latent_shape); inverse of `_unpack`."""
        return latents

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked latents to images (B, 3, H, W) in [-1, 1], float32; here an AutoencoderKL with the config's
        scaling and shift (FLUX.1, SD3, Z-Image)."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents, return_dict=False)[0].float()

    def _vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to unpacked float32 latents, the posterior's mode (deterministic)."""
        vae = self.pipe.vae
        posterior = vae.encode(images.to(vae.dtype)).latent_dist
        return ((posterior.mode() - vae.config.shift_factor) * vae.config.scaling_factor).float()

    def _call(
        self, model: torch.nn.Module, hidden: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """One transformer call on `hidden` (B, *latent_shape) in the model's dtype at `sigma` (B,) float32 in
        [0, 1]: the velocity v ~ eps - x0 (families whose model predicts -v negate it here)."""
        raise NotImplementedError

    def _guide(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance: v = v_uncond + s (v_cond - v_uncond)."""
        return uncond + self.cfg_scale * (cond - uncond)

    @classmethod
    def tiny_pipeline(cls, seed: int = 0) -> DiffusionPipeline:
        """A tiny random pipeline of this family's real classes, deterministic given `seed` (`egrpo tiny`)."""
        raise NotImplementedError

    @classmethod
    def pipeline_sigmas(
        cls, scheduler_config: dict[str, Any], steps: int, image_tokens: int
    ) -> torch.Tensor:
        """float64 sigmas (T + 1, the last 0) of the family pipeline's own sampling loop at `steps` steps for an
        image of `image_tokens` transformer tokens (`sampler.schedule: pipeline`)."""
        raise NotImplementedError

    # entropy probe (egrpo/entropy/attention.py) ---------------------------------------------------------

    @classmethod
    def attention_modules(cls, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The attention modules the probe can measure, in forward order (`ProbeSettings.blocks` counts them)."""
        raise NotImplementedError

    @classmethod
    def check_probe_support(cls, attn: torch.nn.Module) -> None:
        """Raise if `probe_query_key` does not mirror this module's processor (its Q/K lines)."""
        raise NotImplementedError

    @classmethod
    def probe_call(cls, transformer_inputs: dict[str, Any]) -> dict[str, Any]:
        """What `probe_query_key` needs from the transformer call itself (its bound forward arguments), e.g. the
        image token count; recorded by a pre-hook on the transformer at every call."""
        return {}

    @classmethod
    def probe_query_key(
        cls,
        attn: torch.nn.Module,
        inputs: dict[str, Any],
        call: dict[str, Any],
        rows: Callable[[int], torch.Tensor],
        heads: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(query (B, h, R, d) of the sampled image rows, key (B, h, N, d) of every key, key mask (B, N) bool or
        None), recomputed from the attention module's bound forward `inputs` exactly as its processor makes
        them (projections, q/k norms, RoPE). `rows(image_tokens)` gives the sampled rows, `heads` the selected
        heads (() = all); `call` is `probe_call`'s record of the current transformer call."""
        raise NotImplementedError

    # memory plan (egrpo/memory.py) -------------------------------------------------------------------------

    @classmethod
    def memory_shape(cls, transformer: torch.nn.Module) -> TransformerShape:
        """The memory-relevant shape of this family's transformer (meta or real)."""
        raise NotImplementedError

    @classmethod
    def saved_elements(
        cls, shape: TransformerShape, image_tokens: int, text_tokens: int, dtype_bytes: int
    ) -> dict[str, float]:
        """Elements one row keeps for backward under full fine-tuning: per block of each kind in
        `shape.blocks`, and "outside" the blocks."""
        raise NotImplementedError

    @classmethod
    def inference_elements(
        cls, shape: TransformerShape, image_tokens: int, text_tokens: int, dtype_bytes: int
    ) -> float:
        """Elements alive in one row's no-grad transformer call at its largest block."""
        raise NotImplementedError

    @classmethod
    def token_counts(
        cls, transformer_config: dict[str, Any], vae_scale: int, height: int, width: int, max_sequence_length: int
    ) -> tuple[int, int]:
        """(image tokens, text tokens) of one row's transformer call."""
        raise NotImplementedError

    @classmethod
    def prompt_elements(cls, shape: TransformerShape, text_tokens: int) -> float:
        """Elements of one cached prompt's conditioning: its text states and pooled vector."""
        return text_tokens * shape.text_width + shape.pooled_dim

    # ----------------------------------------------------------------------------------------- conditioning

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Batched transformer conditioning, every tensor batch-first (so callers may index, repeat and
        concatenate it freely), computed by the family's `_encode` from the pipeline's own encoding.

        Each distinct prompt is encoded once while it stays in the cache: the text encoders are frozen, and
        re-encoding every rollout would cost as much as a denoising step. The cache lives on the policy's
        device and keeps the PROMPT_CACHE_SIZE most recently used prompts (a FLUX prompt's T5 states are 4 MB;
        a dataset's worth would not fit).
        """
        new = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if new:
            if all(getattr(self.pipe, name, None) is None for name in self.text_encoder_names):
                raise RuntimeError(f"the text encoders were freed and {len(new)} prompts are not cached "
                                   f"(e.g. {new[0]!r}); add their embeddings with add_embeddings first")
            with torch.no_grad():
                encoded = self._encode(new)
            self.add_embeddings({prompt: {key: value[i] for key, value in encoded.items()}
                                 for i, prompt in enumerate(new)})
        for p in prompts:
            self._prompt_cache.move_to_end(p)
        keys = self._prompt_cache[prompts[0]].keys()
        return {key: torch.stack([self._prompt_cache[p][key] for p in prompts]) for key in keys}

    def add_embeddings(self, embeddings: dict[str, dict[str, torch.Tensor]]) -> None:
        """Put prompts' conditioning (as `prompt_embeddings` returns it) into the cache."""
        for prompt, cond in embeddings.items():
            self._prompt_cache[prompt] = {key: value.to(self.device) for key, value in cond.items()}
            self._prompt_cache.move_to_end(prompt)
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)

    def prompt_embeddings(self, prompts: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Each distinct prompt's conditioning on the CPU, to hand to a policy without text encoders. With
        classifier-free guidance the empty prompt comes along."""
        wanted = list(dict.fromkeys(prompts + ([""] if self.cfg_scale != 1.0 else [])))
        cond = self.encode_prompts(wanted)
        return {p: {key: value[i].cpu() for key, value in cond.items()} for i, p in enumerate(wanted)}

    def free_text_encoders(self) -> None:
        """Drop the text encoders (T5-XXL is ~9.5 GB in bf16); prompts must then arrive by `add_embeddings`."""
        for name in self.text_encoder_names:
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------------- latents

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """(B, *latent_shape) float32 noise, one CPU generator per seed: a sample's noise depends on its seed
        alone, not on what else is in the batch, and equals diffusers' with `generator=[Generator(seed)...]`."""
        noise = torch.stack(
            [torch.randn(self._noise_shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
        )
        return self._pack(noise).to(self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float32 in [0, 1]. Differentiable: reward gradients may flow through it."""
        return (self._vae_decode(self._unpack(latents)) / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Inverse of `decode`, for preparing flow-matching training data: images (B, 3, H, W) in [0, 1] to
        float32 latents in the sampler's shape."""
        return self._pack(self._vae_encode(images.to(self.device) * 2 - 1).float())

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) in overlapping tiles, diffusers' `enable_tiling`: the VAE's memory per image stops
        growing with the image's size, and pixels near tile seams change slightly. Smaller images than a tile
        (the VAE's `sample_size`, 1024 px for FLUX's and SD3.5's) still decode whole."""
        if getattr(self.pipe, "vae", None) is not None:
            self.pipe.vae.enable_tiling()

    # ---------------------------------------------------------------------------------------------- velocity

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """v_theta(x, sigma, c) ~ eps - x0, float32, shaped like x. `sigma` is a float or a (B,) tensor in
        [0, 1]. Follows the grad mode of the caller; inside `reference()` it is the reference policy's.
        With cfg_scale > 1 one call runs both halves, the unconditional one on the empty prompt (diffusers'
        default negative prompt), and `_guide` combines them."""
        model = self.active_transformer
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).expand(batch)
        hidden = x.to(device=self.device, dtype=self.dtype)
        if self.cfg_scale == 1.0:
            return self._call(model, hidden, sigma, cond).float()
        empty = self.encode_prompts([""])  # cached: one row, expanded (not copied) to the batch
        both = {key: torch.cat([empty[key].to(value.dtype).expand_as(value), value]) for key, value in cond.items()}
        uncond, cond_out = self._call(model, torch.cat([hidden, hidden]), torch.cat([sigma, sigma]), both).chunk(2)
        return self._guide(uncond.float(), cond_out.float())

    # ---------------------------------------------------------------------------------------------- training

    def setup_finetune(
        self,
        mode: FinetuneMode,
        *,
        rank: int = 8,
        alpha: float = 8.0,
        targets: tuple[str, ...] = ("attention",),
        keep_reference: bool = True,
    ) -> None:
        """Make the transformer trainable and keep a reference policy for KL terms and attention-entropy
        baselines. Text encoders and the VAE stay frozen.

        `lora`: a peft adapter with peft's default init, so B = 0 and the adapter starts as an exact no-op
        (the first rollouts come from the base model, and replayed log-prob ratios are exactly 1). Its
        parameters are kept in float32 even when the model is bf16, as diffusers' training scripts do, so
        small optimiser updates are not rounded away. The reference is the adapter switched off.
        `full`: every transformer parameter trains; the reference is a frozen deep copy of the initial
        weights (twice the transformer's memory), kept only with `keep_reference` (a KL term or AEGPO's dE
        needs it; a FLUX.1-dev learner saves 24 GB without it).
        """
        if self.finetune_mode is not None:
            raise RuntimeError(f"finetuning is already set up ({self.finetune_mode})")
        if mode == "lora":
            self.transformer.requires_grad_(False)
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=self.lora_modules(targets))
            self.transformer.add_adapter(config)
            cast_training_params(self.transformer, dtype=torch.float32)
        elif mode == "full":
            if keep_reference:
                self._reference_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
            self.transformer.requires_grad_(True)
        else:
            raise ValueError(f"finetune mode must be 'lora' or 'full', got {mode!r}")
        self.transformer.eval()  # peft adds its modules in train mode; egrpo never wants dropout in rollouts
        self.finetune_mode = mode

    @classmethod
    def lora_modules(cls, targets: tuple[str, ...]) -> list[str]:
        """Module-name suffixes for peft, with this family's preset names (`lora_presets`) replaced by their
        modules."""
        return list(dict.fromkeys(m for t in targets for m in cls.lora_presets.get(t, (t,))))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.named_trainable_parameters().values())

    def named_trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trained parameters under the transformer's module names (the full-weight broadcast's names)."""
        return {name: p for name, p in self.transformer.named_parameters() if p.requires_grad}

    @property
    def active_transformer(self) -> torch.nn.Module:
        """The transformer `velocity` calls now: the reference copy inside `reference()` under full
        fine-tuning, else the (possibly LoRA-wrapped) trained one. Entropy probes attach here."""
        return self._reference_transformer if self._use_reference else self.transformer

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Inside this block `velocity` is the reference (initial) policy. Without finetuning the model is
        its own reference and this does nothing."""
        if self.finetune_mode == "lora":
            self.transformer.disable_adapters()
            try:
                yield
            finally:
                self.transformer.enable_adapters()
        elif self.finetune_mode == "full":
            if self._reference_transformer is None:
                raise RuntimeError("no reference policy was kept (setup_finetune(keep_reference=False))")
            self._use_reference = True
            try:
                yield
            finally:
                self._use_reference = False
        else:
            yield

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The trained weights themselves, detached but sharing storage (writing into them writes the model):
        the LoRA adapter (peft's keys) or the whole transformer's state (buffers included): what object-store
        sync sends and checkpoints hold. The full-weight broadcast sends `named_trainable_parameters` instead."""
        if self.finetune_mode == "lora":
            return get_peft_model_state_dict(self.transformer)
        if self.finetune_mode == "full":
            return self.transformer.state_dict()
        raise RuntimeError("call setup_finetune first")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of `trainable_tensors` on the CPU (checkpoints, the object store)."""
        return {key: value.detach().cpu().clone() for key, value in self.trainable_tensors().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Exact inverse of `trainable_state_dict`; a key that does not match is an error."""
        if self.finetune_mode == "lora":
            result = set_peft_model_state_dict(self.transformer, state)
            missing = [key for key in result.missing_keys if "lora_" in key]
            if result.unexpected_keys or missing:
                raise KeyError(f"LoRA state mismatch: unexpected {result.unexpected_keys}, missing {missing}")
        elif self.finetune_mode == "full":
            self.transformer.load_state_dict(state)
        else:
            raise RuntimeError("call setup_finetune first")

    def save_weights(self, folder: str | Path) -> None:
        """Save the trained weights in diffusers' own formats: for LoRA, a folder that
        `pipe.load_lora_weights(folder)` reads (pytorch_lora_weights.safetensors, with the LoraConfig as
        metadata so a rank != alpha adapter loads at the right scale); for full finetuning, a transformer
        folder for `from_pretrained` (safetensors)."""
        if self.finetune_mode == "lora":
            type(self.pipe).save_lora_weights(
                folder,
                transformer_lora_layers=get_peft_model_state_dict(self.transformer),
                transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
            )
        elif self.finetune_mode == "full":
            self.transformer.save_pretrained(folder, safe_serialization=True)
        else:
            raise RuntimeError("call setup_finetune first")
