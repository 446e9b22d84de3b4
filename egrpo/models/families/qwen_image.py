"""Qwen-Image (QwenImagePipeline, QwenImageTransformer2DModel, AutoencoderKLQwenImage, Qwen2.5-VL).

As diffusers 0.42's pipeline_qwenimage.py does it:
- Prompts: each prompt goes into the pipeline's chat template (a system turn asking for a detailed image
  description, then the prompt as the user turn, then the assistant's turn opened); Qwen2.5-VL's last hidden
  states, with the first 34 tokens (`prompt_template_encode_start_idx`, the system turn in Qwen's tokenizer)
  dropped, are the text states: one variable-length sequence per prompt, zero-padded with a mask, and cut to
  max_sequence_length (at most 1024). `_encode` pads every prompt to max_sequence_length; `_call` trims a batch
  to its longest prompt and passes the mask only when lengths differ, as the pipeline does.
- Latents: the VAE's 16 channels with a frame axis; noise is drawn as (1, C, h, w) per sample (prepare_latents'
  (B, 1, C, h, w)) and packed 2x2 into (tokens, 4 C) by `_pack_latents`; the VAE decodes (B, C, 1, h, w) with
  the config's per-channel latents_mean / latents_std.
- The transformer takes timestep = t / 1000 (t = the scheduler's sigma * 1000), `img_shapes` (one (1, h/2, w/2)
  grid per row) and `encoder_hidden_states_mask`; no guidance embedding (Qwen-Image has none; diffusers 0.42's
  transformer cannot run one: its guidance branch calls the timestep embedder with an argument too many).
- True CFG (`true_cfg_scale` with a negative prompt): the combined prediction is rescaled to the conditional
  one's norm over each token's channels. egrpo's unconditional half is the empty prompt; the pipeline runs the
  two halves as two calls, egrpo as one batch, padded and masked.
- Schedule: sigmas = linspace(1, 1/T, T), shifted by mu = calculate_shift(image tokens) under the scheduler's
  dynamic (exponential) shifting, then stretched to end at its `shift_terminal` (Qwen-Image: 0.02).
- The probe reads each block's `attn` (`QwenDoubleStreamAttnProcessor2_0`): joint sequence [text, image],
  per-head RMS norms on q and k, complex RoPE (image and text frequencies), and the text padding mask, which
  it returns as the key mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from egrpo.entropy.attention import project_heads
from egrpo.memory import TransformerShape, count_parameters, fp32_copy_units
from egrpo.models.policy import ATTENTION_PROJECTIONS, FlowPolicy, shift_mu
from egrpo.models.tiny import eval_mode, qwen_tokenizer

MLP_PROJECTIONS = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
MAX_SEQUENCE_LENGTH = 1024  # QwenImagePipeline.check_inputs refuses longer
DEFAULT_SAMPLE_SIZE = 128  # QwenImagePipeline.default_sample_size, in latent pixels


class QwenImagePolicy(FlowPolicy):
    family = "qwen-image"
    default_schedule = "pipeline"  # the pipeline's own scheduler, as the public RL code for this family samples
    lora_presets = {"attention": ATTENTION_PROJECTIONS, "qwen-image": ATTENTION_PROJECTIONS + MLP_PROJECTIONS}
    supports_cfg = True
    # The 34 dropped tokens are Qwen's tokenization of the system turn; with the tiny twin's character-level
    # tokenizer they are its first 34 characters, and ~130 template tokens stay ahead of the prompt (Qwen's
    # tokenizer: the user turn's few), so the tiny twin needs room for the prompt after them.
    tiny_settings = {"height": 32, "width": 32, "max_sequence_length": 256}

    def __init__(self, pipe: QwenImagePipeline, **kwargs: Any) -> None:
        if pipe.transformer.config.guidance_embeds:
            raise ValueError("Qwen-Image transformers with guidance embeddings do not run in diffusers 0.42")
        if kwargs.get("max_sequence_length", 512) > MAX_SEQUENCE_LENGTH:
            raise ValueError(f"QwenImagePipeline takes at most {MAX_SEQUENCE_LENGTH} prompt tokens, "
                             f"got max_sequence_length={kwargs['max_sequence_length']}")
        super().__init__(pipe, **kwargs)

    @classmethod
    def vae_scale(cls, vae_config: dict[str, Any] | None, settings: dict[str, Any]) -> int:
        """QwenImagePipeline's vae_scale_factor: 2 ** len(temperal_downsample) (8 for Qwen-Image's VAE)."""
        return 2 ** len(vae_config["temperal_downsample"])

    @classmethod
    def default_size(cls, transformer_config: dict[str, Any], vae_scale: int) -> int:
        return DEFAULT_SAMPLE_SIZE * vae_scale

    def _latent_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        scale = self.pipe.vae_scale_factor
        if self.height % (2 * scale) or self.width % (2 * scale):
            raise ValueError(f"height and width must be multiples of {2 * scale}, got {self.height}x{self.width}")
        channels = self.transformer.config.in_channels // 4
        rows, columns = self.height // scale // 2, self.width // scale // 2
        self._img_shape = [(1, rows, columns)]  # one frame of rows x columns tokens, for the transformer's RoPE
        return (1, channels, 2 * rows, 2 * columns), (rows * columns, 4 * channels)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        batch, length, width = embeds.shape
        valid = torch.ones(batch, length, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        pad = self.max_sequence_length - length
        return {
            "encoder_hidden_states": torch.cat([embeds, embeds.new_zeros(batch, pad, width)], dim=1),
            "encoder_hidden_states_mask": torch.cat([valid, valid.new_zeros(batch, pad)], dim=1),
        }

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        batch, _, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width)

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        # _unpack_latents gives the VAE's (B, C, 1, h, w); the noise's layout is (B, 1, C, h, w)
        return self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor).transpose(1, 2)

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latents_mean and 1 / latents_std, shaped (1, C, 1, 1, 1) as the pipeline
        makes them."""
        config = self.pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(like.device, like.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, inverse_std

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = latents.transpose(1, 2).to(vae.dtype)
        mean, inverse_std = self._latent_statistics(latents)
        return vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0].float()

    def _vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior's mode, normalised as QwenImageImg2ImgPipeline does: (z - mean) / std."""
        vae = self.pipe.vae
        latents = vae.encode(images[:, :, None].to(vae.dtype)).latent_dist.mode()
        mean, inverse_std = self._latent_statistics(latents)
        return ((latents - mean) * inverse_std).transpose(1, 2).float()

    def _call(self, model: nn.Module, hidden: torch.Tensor, sigma: torch.Tensor,
              cond: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = cond["encoder_hidden_states_mask"]
        length = int(mask.sum(dim=1).max())
        mask = mask[:, :length]
        return model(
            hidden_states=hidden,
            # the pipeline's timestep: t = sigma * 1000 from the scheduler, cast to the latents' dtype, / 1000
            timestep=(sigma * 1000).to(self.dtype) / 1000,
            guidance=None,
            encoder_hidden_states=cond["encoder_hidden_states"][:, :length].to(self.dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[self._img_shape] * hidden.shape[0],
            return_dict=False,
        )[0]

    def _guide(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """QwenImagePipeline's true CFG: the linear combination, rescaled per token to the conditional
        prediction's norm over the packed channels."""
        combined = uncond + self.cfg_scale * (cond - uncond)
        return combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))

    @classmethod
    def tiny_pipeline(cls, seed: int = 0) -> QwenImagePipeline:
        return build_qwen_image_pipeline(seed=seed)

    @classmethod
    def pipeline_sigmas(cls, scheduler_config: dict[str, Any], steps: int, image_tokens: int) -> torch.Tensor:
        """QwenImagePipeline's step 5: sigmas = linspace(1, 1/T, T) and mu = calculate_shift(image tokens) with
        the scheduler config's seq lens and shifts (the pipeline's fallbacks 256, 4096, 0.5, 1.15); the
        scheduler applies mu under `use_dynamic_shifting` (Qwen-Image: exponential), else its fixed `shift`,
        then stretches to `shift_terminal` if set."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        config = scheduler.config
        mu = shift_mu(config, image_tokens)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return scheduler.sigmas.double()

    # entropy probe ---------------------------------------------------------------------------------------

    @classmethod
    def attention_modules(cls, transformer: nn.Module) -> list[nn.Module]:
        return [block.attn for block in transformer.transformer_blocks]

    @classmethod
    def check_probe_support(cls, attn: nn.Module) -> None:
        if type(attn.processor) is not QwenDoubleStreamAttnProcessor2_0:
            raise TypeError("the entropy probe reads QwenDoubleStreamAttnProcessor2_0's Q/K, not "
                            f"{type(attn.processor).__name__}")

    @classmethod
    def probe_query_key(cls, attn: nn.Module, inputs: dict[str, Any], call: dict[str, Any],
                        rows: Callable[[int], torch.Tensor], heads: tuple[int, ...]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Q of the sampled image rows and all of K as `QwenDoubleStreamAttnProcessor2_0` makes them: joint
        order [text, image], RMS-normed per head, complex RoPE; the key mask is its joint attention mask
        (the text mask, then every image token)."""
        # Attention.forward takes the block's encoder_hidden_states_mask and image_rotary_emb as **kwargs
        extra = inputs.get("cross_attention_kwargs", {})
        if inputs.get("attention_mask") is not None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 takes no attention_mask")
        image, text = inputs["hidden_states"], inputs["encoder_hidden_states"]
        sampled = rows(image.shape[1])
        query = project_heads(attn, attn.to_q, attn.norm_q, image[:, sampled], heads)
        text_key = project_heads(attn, attn.add_k_proj, attn.norm_added_k, text, heads)
        image_key = project_heads(attn, attn.to_k, attn.norm_k, image, heads)
        rotary = extra.get("image_rotary_emb")
        if rotary is not None:
            image_freqs, text_freqs = rotary
            query = apply_rotary_emb_qwen(query, image_freqs[sampled], use_real=False)
            text_key = apply_rotary_emb_qwen(text_key, text_freqs, use_real=False)
            image_key = apply_rotary_emb_qwen(image_key, image_freqs, use_real=False)
        key = torch.cat([text_key, image_key], dim=1)
        text_mask = extra.get("encoder_hidden_states_mask")
        key_mask = None
        if text_mask is not None:
            image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
            key_mask = torch.cat([text_mask.bool(), image_mask], dim=1)
        return query.transpose(1, 2), key.transpose(1, 2), key_mask

    # memory plan (egrpo/memory.py's docstring has the conventions) -------------------------------------------
    #
    # Per token of one block (image and text streams alike; `QwenImageTransformerBlock`), full fine-tuning
    # keeps: the stream's input (LayerNorm), the normed and modulated tensors (the modulation's mul and the
    # q/k/v projections' input), q and k before and after their RMS norms (4 D; in 16-bit also the norms'
    # fp32 copies, 2 r D), the joint q, k, v (SDPA's inputs) and its output, the output projection's input and
    # output (the gate's mul), the residual (LayerNorm 2), its normed and modulated tensors, the MLP's GELU input
    # and output (2 F) and its output (the gate's mul): 13 D + 2 F + (4 + 2 r) D. RoPE (a complex product with
    # constant frequencies) keeps nothing. Outside: img_in's input (C) and the output norm, modulation and
    # projection (3 D) per image token; the text states and their RMS norm (txt_norm) per text token:
    # (2 + r) J.

    @classmethod
    def memory_shape(cls, transformer: nn.Module) -> TransformerShape:
        config = transformer.config
        blocks = list(transformer.transformer_blocks)
        params, buffers = count_parameters(transformer)
        return TransformerShape(
            class_name=type(transformer).__name__, family=cls.family, params=params, buffer_elements=buffers,
            width=config.num_attention_heads * config.attention_head_dim, heads=config.num_attention_heads,
            mlp_width=blocks[0].img_mlp.net[0].proj.out_features, blocks=(("joint", len(blocks)),),
            qk_rms_norm=True, token_channels=config.in_channels, text_width=config.joint_attention_dim,
            pooled_dim=0, largest_block_params=max(count_parameters(b)[0] for b in blocks),
            largest_parameter=max(p.numel() for p in transformer.parameters()),
        )

    @classmethod
    def saved_elements(cls, shape: TransformerShape, image_tokens: int, text_tokens: int,
                       dtype_bytes: int) -> dict[str, float]:
        d, f, r = shape.width, shape.mlp_width, fp32_copy_units(dtype_bytes)
        return {"joint": (image_tokens + text_tokens) * (13 * d + 2 * f + (4 + 2 * r) * d),
                "outside": image_tokens * (shape.token_channels + 3 * d) + text_tokens * (2 + r) * shape.text_width}

    @classmethod
    def inference_elements(cls, shape: TransformerShape, image_tokens: int, text_tokens: int,
                           dtype_bytes: int) -> float:
        """The block keeps its intermediate tensors in locals until it returns, and runs the two streams' MLPs
        one after the other. While the image MLP runs: image tokens hold 7 D (input, normed, modulated,
        attention output, residual, normed, modulated) + 2 F, text tokens 5 D; during the text MLP, image tokens
        9 D (+ the MLP's output and the new residual), text tokens 7 D + 2 F; during attention every token
        holds 3 D of the block's and 9 D of the processor's (q, k, v per stream and joint) and the output."""
        d, f = shape.width, shape.mlp_width
        n = image_tokens + text_tokens
        return max(image_tokens * (2 * f + 7 * d) + text_tokens * 5 * d,
                   image_tokens * 9 * d + text_tokens * (2 * f + 7 * d),
                   n * 13 * d)

    @classmethod
    def token_counts(cls, transformer_config: dict[str, Any], vae_scale: int, height: int, width: int,
                     max_sequence_length: int) -> tuple[int, int]:
        """Image tokens: 2x2 latent patches; text tokens at most max_sequence_length (a batch's longest)."""
        patch = transformer_config["patch_size"]
        return (height // vae_scale // patch) * (width // vae_scale // patch), max_sequence_length


def build_qwen_image_pipeline(
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    text_dim: int = 32,
    seed: int = 0,
) -> QwenImagePipeline:
    """A tiny QwenImagePipeline of the real classes, deterministic given `seed` (the global torch RNG is left
    untouched): a `num_layers`-block transformer, a 2x VAE (one spatial downsampling, 16 latent channels, the
    real latents_mean / latents_std), a 2-layer Qwen2.5-VL whose text model is `text_dim` wide (with a 1-block
    vision tower the pipeline never calls), the character-level Qwen tokenizer, and Qwen-Image's own scheduler
    configuration (dynamic exponential shifting, shift_terminal 0.02)."""
    tokenizer = qwen_tokenizer()
    vision_tokens = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                     "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    vision_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in vision_tokens.items()}
    half_head = text_dim // 2 // 2  # rotary frequencies per head of the 2-head text model
    time = half_head // 4
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        # Qwen2.5-VL's multimodal RoPE splits a head's frequencies over (time, height, width), 7B: (16, 24, 24)
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": [time, (half_head - time) // 2, half_head - time - (half_head - time) // 2]},
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=text_dim,
                         fullatt_block_indexes=[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **vision_ids))
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            joint_attention_dim=text_dim, axes_dims_rope=_rope_axes(attention_head_dim),
        )
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                     temperal_downsample=[False])
    pipe = QwenImagePipeline(scheduler=qwen_image_scheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)
    return eval_mode(pipe)


def qwen_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen/Qwen-Image's scheduler_config.json (as published)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE dims for the (frame, row, column) axes: even, summing to the head dim, row = column; Qwen-Image's
    (16, 56, 56) at head dim 128."""
    if head_dim % 4:
        raise ValueError(f"attention_head_dim must be a multiple of 4 for rotary embeddings, got {head_dim}")
    frame = 2 * (head_dim // 16)
    side = (head_dim - frame) // 2
    if side % 2:
        frame, side = frame + 2, side - 1
    return frame, side, side
