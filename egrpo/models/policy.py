"""The policy adapter: a diffusers FLUX or SD3 pipeline seen as the velocity field v_theta(x, sigma, c).

Samplers, rollouts and losses only ever call `encode_prompts`, `initial_noise`, `velocity` and `decode`, on
latents in one fixed per-sample shape (`latent_shape`), so the model family stays a detail of this module.
The two families differ only in small, explicit places (`if self.family == "flux"`):

- FLUX works on *packed* latents, (tokens, 4 C) with 2x2 latent patches per token, exactly as
  `FluxPipeline._pack_latents` makes them; its transformer takes timestep = sigma (the pipeline divides the
  scheduler's sigma * 1000 by 1000), an optional distilled-guidance value, and position ids.
- SD3 works on (C, h, w) latents; its transformer takes timestep = sigma * 1000. No CFG is done here.

A FLUX pipeline saved without a VAE (`egrpo.models.tiny`) has *pixel* latents: the image in [-1, 1],
pixel-unshuffled by the factor in the folder's `egrpo.json`. That is the toy world's exactly invertible
stand-in for an autoencoder.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers.utils import logging as transformers_logging

from egrpo.models.folder import SUPPORTED_PIPELINES, Family, check_pipeline_folder
from egrpo.models.tiny import EGRPO_SETTINGS_FILE

FinetuneMode = Literal["lora", "full"]

# model_index.json's _class_name -> (family, pipeline class); the names live in egrpo.models.folder, which the
# CLI's pre-flight check reads without importing diffusers.
_CLASSES: dict[Family, type] = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
_PIPELINES: dict[str, tuple[Family, type]] = {
    name: (family, _CLASSES[family]) for name, family in SUPPORTED_PIPELINES.items()
}

# The attention projections of both FLUX's and SD3's joint blocks (image and text streams). FLUX's single
# blocks reuse to_q/to_k/to_v.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
PROMPT_CACHE_SIZE = 256  # prompts whose conditioning a policy keeps (FLUX: 4 MB each)
_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
# Names that `model.lora_targets` may use for a family's attention and MLP projections together (Flow-GRPO's
# SD3 LoRA adapts attention only: the `attention` preset); any other entry is a module-name suffix, as peft
# reads it.
LORA_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": DEFAULT_LORA_TARGETS,
    "flux": DEFAULT_LORA_TARGETS + _FEED_FORWARD + ("proj_mlp",),  # proj_mlp: the single blocks' MLP input
    "sd3": DEFAULT_LORA_TARGETS + _FEED_FORWARD,
}


def expand_lora_targets(targets: tuple[str, ...]) -> list[str]:
    """Module-name suffixes for peft, with preset names (LORA_PRESETS) replaced by their modules."""
    return list(dict.fromkeys(m for t in targets for m in LORA_PRESETS.get(t, (t,))))


class FlowPolicy:
    """A flow-matching text-to-image model as an RL policy (see the module docstring)."""

    def __init__(
        self,
        pipe: FluxPipeline | StableDiffusion3Pipeline,
        *,
        family: Family,
        height: int,
        width: int,
        guidance: float = 3.5,
        max_sequence_length: int = 512,
        pixel_unshuffle: int | None = None,
        cfg_scale: float = 1.0,
    ) -> None:
        """Wrap a loaded pipeline; most callers want `from_pretrained`. `pixel_unshuffle` is required exactly
        when the pipeline has no VAE. `cfg_scale` > 1 turns on classifier-free guidance (SD3 only: FLUX.1-dev's
        guidance is distilled into `guidance`)."""
        if cfg_scale != 1.0 and family != "sd3":
            raise ValueError(f"classifier-free guidance (cfg_scale={cfg_scale}) is for SD3; FLUX uses `guidance`")
        self.family: Family = family
        self.pipe = pipe
        self.transformer: torch.nn.Module = pipe.transformer
        self.device: torch.device = pipe.transformer.device
        self.dtype: torch.dtype = pipe.transformer.dtype
        self.height, self.width = height, width
        self.guidance = guidance
        self.cfg_scale = cfg_scale
        self.max_sequence_length = max_sequence_length
        self.pixel_unshuffle = pixel_unshuffle

        if pipe.vae is None:
            if family != "flux" or pixel_unshuffle is None:
                raise ValueError("only FLUX pipelines may lack a VAE, and then `pixel_unshuffle` is required")
            # The pipeline assumes 8x when it has no VAE; make its own latent geometry (prepare_latents,
            # _unpack_latents, and so a plain pipe(...) call) match the pixel latents.
            pipe.vae_scale_factor = pixel_unshuffle
        elif pixel_unshuffle is not None:
            raise ValueError("`pixel_unshuffle` only applies to a pipeline without a VAE")
        scale = pipe.vae_scale_factor
        patch = 2 if family == "flux" else pipe.transformer.config.patch_size
        if height % (scale * patch) or width % (scale * patch):
            raise ValueError(f"height and width must be multiples of {scale * patch}, got {height}x{width}")
        # One sample's unpacked latent, as the pipeline's prepare_latents draws it.
        channels = self.transformer.config.in_channels // (4 if family == "flux" else 1)
        self._unpacked_shape = (channels, height // scale, width // scale)
        if family == "flux":
            tokens = (height // scale // 2) * (width // scale // 2)
            self.latent_shape: tuple[int, ...] = (tokens, 4 * channels)
            self._img_ids = pipe._prepare_latent_image_ids(
                1, height // scale // 2, width // scale // 2, self.device, self.dtype
            )
        else:
            self.latent_shape = self._unpacked_shape

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
        """Load a diffusers FLUX or SD3 folder from local disk (never the hub).

        Size 0 means: the folder's `egrpo.json` if it has one, else the pipeline's own default (FLUX: 1024);
        max_sequence_length 0 likewise, else 512 (FLUX.1-dev's T5 length).
        Components saved as null (e.g. a missing VAE) are passed to diffusers as None explicitly, which is
        the only way its `from_pretrained` accepts such a folder.
        """
        path = Path(path)
        index = check_pipeline_folder(path)  # the CLI's pre-flight check: one line naming a missing file
        family, pipeline_class = _PIPELINES[index["_class_name"]]
        null_components = {name: None for name, spec in index.items() if spec == [None, None]}
        diffusers_logging.disable_progress_bar()  # egrpo shows its own progress; N actors x 6 bars is noise
        transformers_logging.disable_progress_bar()
        pipe = pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True, **null_components)
        pipe.to(device)

        settings_file = path / EGRPO_SETTINGS_FILE
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        pixel_unshuffle = settings.get("pixel_unshuffle")
        default_size = pipe.default_sample_size * (pixel_unshuffle or pipe.vae_scale_factor)
        return cls(
            pipe,
            family=family,
            height=height or settings.get("height") or default_size,
            width=width or settings.get("width") or default_size,
            guidance=guidance,
            max_sequence_length=max_sequence_length or settings.get("max_sequence_length") or 512,
            pixel_unshuffle=pixel_unshuffle,
            cfg_scale=cfg_scale,
        )

    # ----------------------------------------------------------------------------------------- conditioning

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Batched transformer conditioning, every tensor batch-first (so callers may index, repeat and
        concatenate it freely): FLUX `encoder_hidden_states`, `pooled_projections`, `txt_ids`; SD3
        `encoder_hidden_states`, `pooled_projections`.

        Computed by the pipeline's own `encode_prompt`, once per distinct prompt while it stays in the cache:
        the text encoders are frozen, and re-encoding every rollout would cost as much as a denoising step.
        The cache lives on the policy's device and keeps the PROMPT_CACHE_SIZE most recently used prompts
        (a FLUX prompt's T5 states are 4 MB; a dataset's worth would not fit).
        """
        new = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if new:
            if self.pipe.text_encoder is None:
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
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.family == "flux":
            embeds, pooled, txt_ids = self.pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                device=self.device,
                max_sequence_length=self.max_sequence_length,
            )
            # diffusers' txt_ids are (seq, 3), shared by the batch; repeat them to keep the dict batch-first.
            txt_ids = txt_ids.expand(len(prompts), -1, -1)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": txt_ids}
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    # ----------------------------------------------------------------------------------------------- latents

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """(B, *latent_shape) float32 noise, one CPU generator per seed: a sample's noise depends on its seed
        alone, not on what else is in the batch, and equals diffusers' with `generator=[Generator(seed)...]`."""
        noise = torch.stack(
            [
                torch.randn(self._unpacked_shape, generator=torch.Generator("cpu").manual_seed(s))
                for s in seeds
            ]
        )
        return self._pack(noise).to(self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float32 in [0, 1]. Differentiable: reward gradients may flow through it."""
        latents = self._unpack(latents)
        vae = self.pipe.vae
        if vae is None:
            images = F.pixel_shuffle(latents.float(), self.pixel_unshuffle)
        else:
            latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
            images = vae.decode(latents, return_dict=False)[0].float()
        return (images / 2 + 0.5).clamp(0, 1)

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) in overlapping tiles, diffusers' `AutoencoderKL.enable_tiling`: the VAE's memory
        per image stops growing with the image's size, and pixels near tile seams change slightly. A tile is the
        VAE's `tile_sample_min_size` (its config's `sample_size`: 1024 px for FLUX's and SD3.5's VAEs), so
        smaller images still decode whole. Pixel latents (no VAE) decode exactly as before."""
        if self.pipe.vae is not None:
            self.pipe.vae.enable_tiling()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Inverse of `decode`, for preparing flow-matching training data: images (B, 3, H, W) in [0, 1] to
        float32 latents in the sampler's shape. The VAE's posterior mode is used, so it is deterministic."""
        images = images.to(self.device) * 2 - 1
        vae = self.pipe.vae
        if vae is None:
            latents = F.pixel_unshuffle(images.float(), self.pixel_unshuffle)
        else:
            posterior = vae.encode(images.to(vae.dtype)).latent_dist
            latents = (posterior.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        return self._pack(latents.float())

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        if self.family != "flux":
            return latents
        batch, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width)

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        if self.family != "flux":
            return latents
        return self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)

    # ---------------------------------------------------------------------------------------------- velocity

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """v_theta(x, sigma, c) ~ eps - x0, float32, shaped like x. `sigma` is a float or a (B,) tensor in
        [0, 1]. Follows the grad mode of the caller; inside `reference()` it is the reference policy's."""
        model = self.active_transformer
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).expand(batch)
        hidden = x.to(device=self.device, dtype=self.dtype)
        embeds = cond["encoder_hidden_states"].to(self.dtype)
        pooled = cond["pooled_projections"].to(self.dtype)
        if self.family == "flux":
            guidance = None
            if model.config.guidance_embeds:
                guidance = torch.full((batch,), self.guidance, dtype=torch.float32, device=self.device)
            out = model(
                hidden_states=hidden,
                timestep=sigma.to(self.dtype),
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=cond["txt_ids"][0],
                img_ids=self._img_ids,
                return_dict=False,
            )[0]
        elif self.cfg_scale == 1.0:
            out = model(
                hidden_states=hidden,
                timestep=sigma * 1000,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        else:  # v = v_uncond + s (v_cond - v_uncond), the unconditional half on the empty prompt (diffusers' default)
            empty = self.encode_prompts([""])
            out = model(
                hidden_states=torch.cat([hidden, hidden]),
                timestep=torch.cat([sigma, sigma]) * 1000,
                encoder_hidden_states=torch.cat([empty["encoder_hidden_states"].to(self.dtype).expand_as(embeds),
                                                 embeds]),
                pooled_projections=torch.cat([empty["pooled_projections"].to(self.dtype).expand_as(pooled), pooled]),
                return_dict=False,
            )[0]
            uncond, cond_out = out.chunk(2)
            out = uncond + self.cfg_scale * (cond_out - uncond)
        return out.float()

    # ---------------------------------------------------------------------------------------------- training

    def setup_finetune(
        self,
        mode: FinetuneMode,
        *,
        rank: int = 8,
        alpha: float = 8.0,
        targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
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
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=expand_lora_targets(targets))
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
