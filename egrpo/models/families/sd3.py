"""Stable Diffusion 3.x (StableDiffusion3Pipeline, SD3Transformer2DModel).

- Latents are the VAE's (C, h, w), unpacked; the transformer patchifies them itself and takes
  timestep = sigma * 1000.
- Prompts: two CLIPs' hidden states concatenated and padded to T5's width, then T5's states (77 + T5 tokens),
  and the two pooled projections concatenated. Classifier-free guidance is the linear rule (`cfg_scale`).
- The probe reads each joint block's `attn` (`JointAttnProcessor2_0`): the joint sequence is [image, text].
  SD3.5's image-only second attention (`attn2`) is not probed. That processor ignores `attention_mask`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch import nn
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from egrpo.entropy.attention import project_heads
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

CLIP_TOKENS = 77  # SD3's CLIP tokens, ahead of T5's in its text sequence
MLP_PROJECTIONS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


class SD3Policy(FlowPolicy):
    family = "sd3"
    default_schedule = "pipeline"  # the pipeline's own scheduler, as the public RL code for this family samples
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    # Flow-GRPO's SD3 LoRA adapts attention only: the `attention` preset
    lora_presets = {"attention": ATTENTION_PROJECTIONS, "sd3": ATTENTION_PROJECTIONS + MLP_PROJECTIONS}
    supports_cfg = True

    @classmethod
    def default_size(cls, transformer_config: dict[str, Any], vae_scale: int) -> int:
        return transformer_config["sample_size"] * vae_scale  # StableDiffusion3Pipeline's default_sample_size

    def _latent_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        multiple = self.pipe.vae_scale_factor * self.transformer.config.patch_size
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {self.height}x{self.width}")
        scale = self.pipe.vae_scale_factor
        shape = (self.transformer.config.in_channels, self.height // scale, self.width // scale)
        return shape, shape

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _call(self, model: nn.Module, hidden: torch.Tensor, sigma: torch.Tensor,
              cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(
            hidden_states=hidden,
            timestep=sigma * 1000,
            encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype),
            pooled_projections=cond["pooled_projections"].to(self.dtype),
            return_dict=False,
        )[0]

    @classmethod
    def tiny_pipeline(cls, seed: int = 0) -> StableDiffusion3Pipeline:
        return build_sd3_pipeline(seed=seed)

    @classmethod
    def pipeline_sigmas(cls, scheduler_config: dict[str, Any], steps: int, image_tokens: int) -> torch.Tensor:
        """StableDiffusion3Pipeline's step 5: no sigmas are passed, so the scheduler spaces T timesteps from its
        sigma_max down to its training sigma_min (1/1000) and shifts them: the last non-zero sigma is ~0.003
        (shift 3), not shift(1/T); mu = calculate_shift(image tokens) only with `use_dynamic_shifting`."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        config = scheduler.config
        if config.get("use_dynamic_shifting", False):
            mu = shift_mu(config, image_tokens, max_shift=1.16)
            scheduler.set_timesteps(steps, mu=mu)
        else:
            scheduler.set_timesteps(steps)
        return scheduler.sigmas.double()

    # entropy probe ---------------------------------------------------------------------------------------

    @classmethod
    def attention_modules(cls, transformer: nn.Module) -> list[nn.Module]:
        return [block.attn for block in transformer.transformer_blocks]

    @classmethod
    def check_probe_support(cls, attn: nn.Module) -> None:
        if type(attn.processor) is not JointAttnProcessor2_0:
            raise TypeError(
                f"the entropy probe reads JointAttnProcessor2_0's Q/K, not {type(attn.processor).__name__}")

    @classmethod
    def probe_query_key(cls, attn: nn.Module, inputs: dict[str, Any], call: dict[str, Any],
                        rows: Callable[[int], torch.Tensor], heads: tuple[int, ...]
                        ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Q of the sampled image rows and all of K, as `JointAttnProcessor2_0` makes them; joint order
        [image, text]."""
        image, text = inputs["hidden_states"], inputs.get("encoder_hidden_states")
        query = project_heads(attn, attn.to_q, attn.norm_q, image[:, rows(image.shape[1])], heads)
        key = project_heads(attn, attn.to_k, attn.norm_k, image, heads)
        if text is not None:
            key = torch.cat([key, project_heads(attn, attn.add_k_proj, attn.norm_added_k, text, heads)], dim=1)
        return query.transpose(1, 2), key.transpose(1, 2), None

    # memory plan (egrpo/memory.py's docstring has the formulas) ---------------------------------------------

    @classmethod
    def memory_shape(cls, transformer: nn.Module) -> TransformerShape:
        config = transformer.config
        blocks = list(transformer.transformer_blocks)
        dual = len(config.dual_attention_layers or ())
        params, buffers = count_parameters(transformer)
        return TransformerShape(
            class_name=type(transformer).__name__, family=cls.family, params=params, buffer_elements=buffers,
            width=config.num_attention_heads * config.attention_head_dim, heads=config.num_attention_heads,
            mlp_width=blocks[0].ff.net[0].proj.out_features,
            blocks=(("dual", dual), ("joint", len(blocks) - dual)), qk_rms_norm=config.qk_norm == "rms_norm",
            token_channels=config.in_channels * config.patch_size**2, text_width=config.joint_attention_dim,
            pooled_dim=config.pooled_projection_dim,
            largest_block_params=max(count_parameters(b)[0] for b in blocks),
            largest_parameter=max(p.numel() for p in transformer.parameters()),
        )

    @classmethod
    def saved_elements(cls, shape: TransformerShape, image_tokens: int, text_tokens: int,
                       dtype_bytes: int) -> dict[str, float]:
        d, f, n = shape.width, shape.mlp_width, image_tokens + text_tokens
        norms = (4 + 2 * fp32_copy_units(dtype_bytes)) * d if shape.qk_rms_norm else 0.0
        joint = n * (13 * d + 2 * f + norms)
        # an MMDiT-X block's second, image-only attention keeps 6 D + a more per image token
        return {"joint": joint, "dual": joint + image_tokens * (6 * d + norms),
                "outside": image_tokens * (shape.token_channels + 3 * d) + text_tokens * shape.text_width}

    @classmethod
    def inference_elements(cls, shape: TransformerShape, image_tokens: int, text_tokens: int,
                           dtype_bytes: int) -> float:
        # joint blocks run each stream's MLP separately
        return max(image_tokens, text_tokens) * 2 * shape.mlp_width + (image_tokens + text_tokens) * 5 * shape.width

    @classmethod
    def token_counts(cls, transformer_config: dict[str, Any], vae_scale: int, height: int, width: int,
                     max_sequence_length: int) -> tuple[int, int]:
        patch = transformer_config["patch_size"]
        return (height // vae_scale // patch) * (width // vae_scale // patch), CLIP_TOKENS + max_sequence_length


def build_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A tiny StableDiffusion3Pipeline (two projecting CLIP encoders + T5), deterministic given `seed`.

    SD3 concatenates the two CLIPs' hidden states (2 x 16 = 32 wide) and pads them to T5's width (32), and
    concatenates their pooled projections (2 x 32 = 64) as the pooled conditioning.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2, t5 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer([])
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            out_channels=16,
            pos_embed_max_size=64,
        )
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=fixed_shift_scheduler(),
            vae=tiny_vae(),
            text_encoder=CLIPTextModelWithProjection(clip_config(tokenizer, hidden_size=16)),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer_2, hidden_size=16)),
            tokenizer_2=tokenizer_2,
            text_encoder_3=T5EncoderModel(t5_config(t5, d_model=32)),
            tokenizer_3=t5,
        )
    return eval_mode(pipe)


def build_wide_sd3_pipeline(
    *,
    num_layers: int,
    num_attention_heads: int = 24,
    attention_head_dim: int = 64,
    joint_attention_dim: int = 4096,
    pooled_projection_dim: int = 2048,
    dual_attention_layers: tuple[int, ...] = (0,),
    qk_norm: str | None = "rms_norm",
    latent_size: int = 32,
    seed: int = 0,
) -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline whose transformer has a real model's widths at a depth of `num_layers` joint
    blocks; the defaults are SD3.5-medium's (24 heads x 64 = 1536 wide, T5 width 4096, pooled width 2048,
    RMS-normed q/k, MMDiT-X dual attention in block 0). Random weights, deterministic given `seed`.

    The text encoders stay tiny but emit those widths (T5 `joint_attention_dim` wide, each CLIP projecting to
    half of `pooled_projection_dim`), and the VAE is tiny but has SD3's geometry: 8x downsampling into 16
    channels. The positional embedding covers a `latent_size` square latent exactly (SD3.5 keeps a 384 x 384
    patch grid, 0.9 GB in float32, which only bigger images would use).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2, t5 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer([])
        transformer = SD3Transformer2DModel(
            sample_size=latent_size,
            patch_size=2,
            in_channels=16,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            caption_projection_dim=num_attention_heads * attention_head_dim,
            pooled_projection_dim=pooled_projection_dim,
            out_channels=16,
            pos_embed_max_size=latent_size // 2,
            dual_attention_layers=dual_attention_layers,
            qk_norm=qk_norm,
        )
        text_encoders = []
        for clip in (tokenizer, tokenizer_2):
            config = clip_config(clip, hidden_size=16)
            config.projection_dim = pooled_projection_dim // 2  # SD3 concatenates the two pooled projections
            text_encoders.append(CLIPTextModelWithProjection(config))
        vae = tiny_vae(block_out_channels=(8, 8, 16, 16))  # three downsamplings: 8x, as SD3's VAE
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=fixed_shift_scheduler(),
            vae=vae,
            text_encoder=text_encoders[0],
            tokenizer=tokenizer,
            text_encoder_2=text_encoders[1],
            tokenizer_2=tokenizer_2,
            text_encoder_3=T5EncoderModel(t5_config(t5, d_model=joint_attention_dim)),
            tokenizer_3=t5,
        )
    return eval_mode(pipe)


