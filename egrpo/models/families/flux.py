"""FLUX.1 (FluxPipeline, FluxTransformer2DModel): the family file every other one copies.

- Latents are *packed*, (tokens, 4 C) with 2x2 latent patches per token, exactly as
  `FluxPipeline._pack_latents` makes them; the transformer takes timestep = sigma (the pipeline divides the
  scheduler's sigma * 1000 by 1000), an optional distilled-guidance value, and position ids.
- Prompts: CLIP-L's pooled output and T5's states, padded to max_sequence_length, and (seq, 3) text ids.
- A FLUX pipeline saved without a VAE (`build_flux_pipeline(vae=False)`) has *pixel* latents: the image in
  [-1, 1], pixel-unshuffled by the factor in the folder's `egrpo.json`. That is the toy world's exactly
  invertible stand-in for an autoencoder.
- The probe reads the double-stream blocks (`FluxAttnProcessor` with `encoder_hidden_states`: the joint
  sequence is [text, image], the text stream projected by `add_*_proj`) and the single-stream blocks (the block
  concatenates [text, image] itself and the attention gets only the joint sequence, so the image rows are its
  last N_img rows, N_img the token count of the transformer's own `hidden_states`, which `probe_call` records).
  SDPA's default scale 1/sqrt(d), no attention mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn
from transformers import CLIPTextModel, T5EncoderModel

from egrpo.entropy.attention import project_heads, rotate
from egrpo.memory import TransformerShape, count_parameters, fp32_copy_units
from egrpo.models.policy import ATTENTION_PROJECTIONS, FlowPolicy, shift_mu
from egrpo.models.tiny import (
    clip_config,
    clip_tokenizer,
    eval_mode,
    fixed_shift_scheduler,
    t5_config,
    t5_tokenizer,
    tiny_vae,
)

MLP_PROJECTIONS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


class FluxPolicy(FlowPolicy):
    family = "flux"
    default_schedule = "shift"  # DanceGRPO, VisualGRPO, MixGRPO and BranchGRPO sample FLUX.1 at shift(1 - i/T)
    text_encoder_names = ("text_encoder", "text_encoder_2")
    # proj_mlp: the single blocks' MLP input (their attention reuses to_q/to_k/to_v)
    lora_presets = {"attention": ATTENTION_PROJECTIONS,
                    "flux": ATTENTION_PROJECTIONS + MLP_PROJECTIONS + ("proj_mlp",)}

    def __init__(self, pipe: FluxPipeline, **kwargs: Any) -> None:
        settings = kwargs.get("settings") or {}
        self.pixel_unshuffle: int | None = settings.get("pixel_unshuffle")
        if pipe.vae is None:
            if self.pixel_unshuffle is None:
                raise ValueError("a FLUX pipeline without a VAE needs `pixel_unshuffle` in its egrpo.json")
            # The pipeline assumes 8x when it has no VAE; make its own latent geometry (prepare_latents,
            # _unpack_latents, and so a plain pipe(...) call) match the pixel latents.
            pipe.vae_scale_factor = self.pixel_unshuffle
        elif self.pixel_unshuffle is not None:
            raise ValueError("`pixel_unshuffle` only applies to a pipeline without a VAE")
        super().__init__(pipe, **kwargs)

    @classmethod
    def default_size(cls, transformer_config: dict[str, Any], vae_scale: int) -> int:
        return 128 * vae_scale  # FluxPipeline's default_sample_size

    @classmethod
    def vae_scale(cls, vae_config: dict[str, Any] | None, settings: dict[str, Any]) -> int:
        if vae_config is None:  # pixel latents
            return settings["pixel_unshuffle"]
        return super().vae_scale(vae_config, settings)

    def _latent_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        scale = self.pipe.vae_scale_factor
        if self.height % (2 * scale) or self.width % (2 * scale):
            raise ValueError(f"height and width must be multiples of {2 * scale}, got {self.height}x{self.width}")
        channels = self.transformer.config.in_channels // 4
        rows, columns = self.height // scale // 2, self.width // scale // 2
        self._img_ids = self.pipe._prepare_latent_image_ids(1, rows, columns, self.device, self.dtype)
        return (channels, 2 * rows, 2 * columns), (rows * columns, 4 * channels)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, txt_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        # diffusers' txt_ids are (seq, 3), shared by the batch; repeat them to keep the dict batch-first.
        txt_ids = txt_ids.expand(len(prompts), -1, -1)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": txt_ids}

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width)

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.pipe.vae is None:
            return F.pixel_shuffle(latents.float(), self.pixel_unshuffle)
        return super()._vae_decode(latents)

    def _vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.pipe.vae is None:
            return F.pixel_unshuffle(images.float(), self.pixel_unshuffle)
        return super()._vae_encode(images)

    def _call(self, model: nn.Module, hidden: torch.Tensor, sigma: torch.Tensor,
              cond: dict[str, torch.Tensor]) -> torch.Tensor:
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full_like(sigma, self.guidance)
        return model(
            hidden_states=hidden,
            timestep=sigma.to(self.dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_projections"].to(self.dtype),
            encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype),
            txt_ids=cond["txt_ids"][0],
            img_ids=self._img_ids,
            return_dict=False,
        )[0]

    @classmethod
    def tiny_pipeline(cls, seed: int = 0) -> FluxPipeline:
        """FLUX.1-dev's kind: a VAE and guidance embeddings (`build_flux_pipeline` has the other variants)."""
        return build_flux_pipeline(guidance_embeds=True, seed=seed)

    @classmethod
    def pipeline_sigmas(cls, scheduler_config: dict[str, Any], steps: int, image_tokens: int) -> torch.Tensor:
        """FluxPipeline's step 5: sigmas = linspace(1, 1/T, T) and mu = calculate_shift(image tokens), which the
        scheduler uses when its config has `use_dynamic_shifting` (FLUX.1-dev: yes; then `shift` is unused),
        else it applies `shift`."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        config = scheduler.config
        mu = shift_mu(config, image_tokens)
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return scheduler.sigmas.double()

    # entropy probe ---------------------------------------------------------------------------------------

    @classmethod
    def attention_modules(cls, transformer: nn.Module) -> list[nn.Module]:
        return [block.attn for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]]

    @classmethod
    def check_probe_support(cls, attn: nn.Module) -> None:
        if type(attn.processor) is not FluxAttnProcessor:
            raise TypeError(f"the entropy probe reads FluxAttnProcessor's Q/K, not {type(attn.processor).__name__}")

    @classmethod
    def probe_call(cls, transformer_inputs: dict[str, Any]) -> dict[str, Any]:
        return {"image_tokens": transformer_inputs["hidden_states"].shape[1]}

    @classmethod
    def probe_query_key(cls, attn: nn.Module, inputs: dict[str, Any], call: dict[str, Any],
                        rows: Callable[[int], torch.Tensor], heads: tuple[int, ...]
                        ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Q of the sampled image rows and all of K, as `FluxAttnProcessor` makes them; joint order [text, image]."""
        if inputs.get("attention_mask") is not None:
            raise ValueError("the attention entropy probe does not support attention masks")
        hidden, text = inputs["hidden_states"], inputs.get("encoder_hidden_states")
        key = project_heads(attn, attn.to_k, attn.norm_k, hidden, heads)
        if text is not None:  # double-stream: hidden_states is the image stream
            text_tokens, image = text.shape[1], hidden
            key = torch.cat([project_heads(attn, attn.add_k_proj, attn.norm_added_k, text, heads), key], dim=1)
        else:  # single-stream: hidden_states is the joint sequence
            text_tokens = hidden.shape[1] - call["image_tokens"]
            image = hidden[:, text_tokens:]
        sampled = rows(image.shape[1])
        query = project_heads(attn, attn.to_q, attn.norm_q, image[:, sampled], heads)
        query, key = rotate(query, key, inputs.get("image_rotary_emb"), sampled + text_tokens)
        return query.transpose(1, 2), key.transpose(1, 2), None

    # memory plan (egrpo/memory.py's docstring has the formulas) ---------------------------------------------

    @classmethod
    def memory_shape(cls, transformer: nn.Module) -> TransformerShape:
        config = transformer.config
        joint, single = list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)
        mlp_width = joint[0].ff.net[0].proj.out_features if joint else single[0].proj_mlp.out_features
        params, buffers = count_parameters(transformer)
        return TransformerShape(
            class_name=type(transformer).__name__, family=cls.family, params=params, buffer_elements=buffers,
            width=config.num_attention_heads * config.attention_head_dim, heads=config.num_attention_heads,
            mlp_width=mlp_width, blocks=(("joint", len(joint)), ("single", len(single))), qk_rms_norm=True,
            token_channels=config.in_channels, text_width=config.joint_attention_dim,
            pooled_dim=config.pooled_projection_dim,
            largest_block_params=max(count_parameters(b)[0] for b in joint + single),
            largest_parameter=max(p.numel() for p in transformer.parameters()),
        )

    @classmethod
    def saved_elements(cls, shape: TransformerShape, image_tokens: int, text_tokens: int,
                       dtype_bytes: int) -> dict[str, float]:
        d, f, n = shape.width, shape.mlp_width, image_tokens + text_tokens
        norms = (4 + 2 * fp32_copy_units(dtype_bytes)) * d
        return {"joint": n * (13 * d + 2 * f + norms), "single": n * (9 * d + 2 * f + norms),
                "outside": image_tokens * (shape.token_channels + 3 * d) + text_tokens * shape.text_width}

    @classmethod
    def inference_elements(cls, shape: TransformerShape, image_tokens: int, text_tokens: int,
                           dtype_bytes: int) -> float:
        # RoPE and RMSNorm's fp32 temporaries add 2.5 D per token in 16-bit dtypes
        n = image_tokens + text_tokens
        return n * (2 * shape.mlp_width + (10 if dtype_bytes < 4 else 7.5) * shape.width)

    @classmethod
    def token_counts(cls, transformer_config: dict[str, Any], vae_scale: int, height: int, width: int,
                     max_sequence_length: int) -> tuple[int, int]:
        return (height // vae_scale // 2) * (width // vae_scale // 2), max_sequence_length

    @classmethod
    def prompt_elements(cls, shape: TransformerShape, text_tokens: int) -> float:
        return super().prompt_elements(shape, text_tokens) + 3 * text_tokens  # + the text position ids


def build_flux_pipeline(
    *,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    text_dim: int = 32,
    guidance_embeds: bool = False,
    vae: bool = True,
    pixel_unshuffle: int = 2,
    words: list[str] | None = None,
    seed: int = 0,
) -> FluxPipeline:
    """A tiny FluxPipeline, deterministic given `seed` (the global torch RNG is left untouched).

    With `vae=True` the latents are a 16-channel tiny AutoencoderKL's (2x downsampling). With `vae=False` the
    pipeline has no VAE and the latents are pixels: an image in [-1, 1], pixel-unshuffled by `pixel_unshuffle`
    (3 * pixel_unshuffle**2 channels) - the toy world's cheap, exactly invertible "autoencoder".
    `words` become single T5 tokens, so prompts made of them give the text encoder clean, separable inputs.
    """
    latent_channels = 16 if vae else 3 * pixel_unshuffle**2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_tokenizer = clip_tokenizer()
        t5 = t5_tokenizer(words or [])
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,  # FLUX packs 2x2 latent patches into tokens
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=text_dim,
            pooled_projection_dim=text_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=_rope_axes(attention_head_dim),
        )
        pipe = FluxPipeline(
            scheduler=fixed_shift_scheduler(),
            vae=tiny_vae() if vae else None,
            text_encoder=CLIPTextModel(clip_config(text_tokenizer, hidden_size=text_dim)),
            tokenizer=text_tokenizer,
            text_encoder_2=T5EncoderModel(t5_config(t5, d_model=text_dim)),
            tokenizer_2=t5,
            transformer=transformer,
        )
    return eval_mode(pipe)



def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE dims for FLUX's (text, row, column) position axes: even, summing to the head dim, row = column."""
    if head_dim % 2:
        raise ValueError(f"attention_head_dim must be even for rotary embeddings, got {head_dim}")
    first = 2 * (head_dim // 8)
    rest = head_dim - first
    second = 2 * (rest // 4)
    return first, second, rest - second
