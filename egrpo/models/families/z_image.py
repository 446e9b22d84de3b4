"""Z-Image (ZImagePipeline, ZImageTransformer2DModel): Tongyi-MAI's single-stream DiT, Z-Image and Z-Image-Turbo.

What diffusers 0.42's `ZImagePipeline` does, and how egrpo reproduces it:

- Prompts: each prompt goes through the Qwen chat template (one user turn, the generation prompt,
  `enable_thinking=True`, which for Qwen3's template adds no think block), is padded to max_sequence_length and
  encoded by the Qwen3 text encoder; the conditioning is `hidden_states[-2]`, and the pipeline hands the
  transformer a *list* of each prompt's unpadded rows (those of its attention mask). egrpo keeps them padded to
  max_sequence_length, zeros in the padding, with a boolean `prompt_mask`, so every prompt's tensors have one
  shape; `_call` passes the transformer the list of each row's masked rows, as the pipeline does.
- Latents are the VAE's (C, h, w), unpacked. The transformer takes a list of (C, 1, h, w) latents (a frame axis
  of 1), patchifies them itself (2x2 patches), and returns a list of the same shapes. Its timestep is
  (1000 - sigma * 1000) / 1000 = 1 - sigma and its output is minus the velocity: the pipeline negates it before
  the scheduler's Euler step, and so does `_call`. The VAE is an AutoencoderKL with scaling and shift, decoded
  by FlowPolicy's default `_vae_decode`, exactly as the pipeline does.
- Classifier-free guidance: the pipeline runs it when guidance_scale > 0, as pos + g (pos - neg), the negative
  prompt "" by default. That is egrpo's linear rule with cfg_scale = g + 1 (egrpo's cfg_scale 1 = the pipeline's
  guidance_scale 0, no CFG, Z-Image-Turbo's setting); `_guide` computes it in the pipeline's own form. The
  pipeline's defaults cfg_normalization=False and cfg_truncation=1.0 (which never truncates: 1 - sigma < 1) are
  what egrpo reproduces; a renormalisation (cfg_normalization > 0) or an earlier truncation is not implemented.
- Schedule: sigmas = linspace(1, 1/T, T) (torch float32) and mu = calculate_shift(image tokens), used only when
  the scheduler has `use_dynamic_shifting`; Z-Image's scheduler has shift 3 and no dynamic shifting.
- The probe reads the main layers' attention (`ZSingleStreamAttnProcessor`). Each row's unified sequence is
  [image tokens, caption tokens], each part padded by the transformer to a multiple of SEQ_MULTI_OF (32) with a
  learned pad token, then the rows padded to the batch's longest. The processor masks only that batch padding
  (the module's `attention_mask`): the per-part pad tokens are keys every query attends to, so the probe keeps
  them too, and returns the module's mask as the key mask. Image rows are the first N_img positions (the real
  image tokens; `probe_call` records N_img). Q/K as the processor: to_q/to_k, per-head RMS norms, RoPE on
  (real, imaginary) pairs with the transformer's `freqs_cis`. The noise refiner (image tokens only) and the
  context refiner (caption tokens only) are not probed: they are not image-to-text attention, and their
  entropies would be normalised over other key sets than the main layers'.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF, ZSingleStreamAttnProcessor
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
from torch import nn
from transformers import Qwen3Config, Qwen3Model

from egrpo.entropy.attention import project_heads
from egrpo.memory import TransformerShape, count_parameters, fp32_copy_units
from egrpo.models.policy import FlowPolicy, shift_mu
from egrpo.models.tiny import eval_mode, fixed_shift_scheduler, qwen_tokenizer, tiny_vae

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # every block's attention: main and refiners
MLP_PROJECTIONS = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")  # SwiGLU
_FORWARD = inspect.signature(ZImageTransformer2DModel.forward).parameters


class ZImagePolicy(FlowPolicy):
    family = "z-image"
    default_schedule = "pipeline"  # the pipeline's own scheduler, as the public RL code for this family samples
    lora_presets = {"attention": ATTENTION_PROJECTIONS, "z-image": ATTENTION_PROJECTIONS + MLP_PROJECTIONS}
    supports_cfg = True  # the base Z-Image; Z-Image-Turbo is distilled and samples without CFG
    # The chat template alone is ~20 tokens of the character-level tiny tokenizer.
    tiny_settings = {"height": 32, "width": 32, "max_sequence_length": 64}

    @classmethod
    def default_size(cls, transformer_config: dict[str, Any], vae_scale: int) -> int:
        return 1024  # ZImagePipeline: `height = height or 1024`

    def _latent_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        scale = self.pipe.vae_scale_factor
        multiple = scale * self.transformer.config.all_patch_size[0]
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {self.height}x{self.width}")
        shape = (self.transformer.config.in_channels, self.height // scale, self.width // scale)
        return shape, shape

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # encode_prompt writes the templated prompts into the list it is given: hand it a copy
        embeds, _ = self.pipe.encode_prompt(list(prompts), device=self.device, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length)
        padded = embeds[0].new_zeros(len(embeds), self.max_sequence_length, embeds[0].shape[-1])
        mask = torch.zeros(len(embeds), self.max_sequence_length, dtype=torch.bool, device=padded.device)
        for i, rows in enumerate(embeds):
            padded[i, : len(rows)] = rows
            mask[i, : len(rows)] = True
        return {"prompt_embeds": padded, "prompt_mask": mask}

    def _call(self, model: nn.Module, hidden: torch.Tensor, sigma: torch.Tensor,
              cond: dict[str, torch.Tensor]) -> torch.Tensor:
        # each row's unpadded caption, as the pipeline hands them over
        captions = [embeds[mask].to(self.dtype)
                    for embeds, mask in zip(cond["prompt_embeds"], cond["prompt_mask"], strict=True)]
        timestep = (1000 - sigma * 1000) / 1000  # the pipeline's (1000 - t) / 1000 of the scheduler's t = 1000 sigma
        out = model(list(hidden.unsqueeze(2).unbind(0)), timestep, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def _guide(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The pipeline's pos + g (pos - neg) with g = cfg_scale - 1: egrpo's uncond + s (cond - uncond)."""
        return cond + (self.cfg_scale - 1) * (cond - uncond)

    @classmethod
    def tiny_pipeline(cls, seed: int = 0) -> ZImagePipeline:
        return build_z_image_pipeline(seed=seed)

    @classmethod
    def pipeline_sigmas(cls, scheduler_config: dict[str, Any], steps: int, image_tokens: int) -> torch.Tensor:
        """ZImagePipeline's step 5: sigmas = linspace(1, 1/T, T) and mu = calculate_shift(image tokens), which the
        scheduler uses only with `use_dynamic_shifting` (Z-Image's has none: it applies `shift`, 3)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        config = scheduler.config
        mu = shift_mu(config, image_tokens)
        scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(steps), mu=mu)
        return scheduler.sigmas.double()

    # entropy probe ---------------------------------------------------------------------------------------

    @classmethod
    def attention_modules(cls, transformer: nn.Module) -> list[nn.Module]:
        return [layer.attention for layer in transformer.layers]

    @classmethod
    def check_probe_support(cls, attn: nn.Module) -> None:
        if type(attn.processor) is not ZSingleStreamAttnProcessor:
            raise TypeError(
                f"the entropy probe reads ZSingleStreamAttnProcessor's Q/K, not {type(attn.processor).__name__}")

    @classmethod
    def probe_call(cls, transformer_inputs: dict[str, Any]) -> dict[str, Any]:
        """The real image tokens of each row: (F / pF) (h / p) (w / p) of its (C, F, h, w) latent."""
        latents = transformer_inputs["x"]
        if isinstance(latents[0], list):
            raise ValueError("the entropy probe reads text-to-image calls, not Z-Image-Omni's nested inputs")
        patch = transformer_inputs.get("patch_size", _FORWARD["patch_size"].default)
        frames = transformer_inputs.get("f_patch_size", _FORWARD["f_patch_size"].default)
        shapes = {tuple(latent.shape[1:]) for latent in latents}
        if len(shapes) != 1:
            raise ValueError(f"the entropy probe needs one latent size per call, got {sorted(shapes)}")
        f, h, w = shapes.pop()
        return {"image_tokens": (f // frames) * (h // patch) * (w // patch)}

    @classmethod
    def probe_query_key(cls, attn: nn.Module, inputs: dict[str, Any], call: dict[str, Any],
                        rows: Callable[[int], torch.Tensor], heads: tuple[int, ...]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Q of the sampled image rows and all of K, as `ZSingleStreamAttnProcessor` makes them; the unified
        sequence is [image, caption] (module docstring), the key mask the module's own `attention_mask`."""
        hidden, mask = inputs["hidden_states"], inputs.get("attention_mask")
        freqs = inputs["cross_attention_kwargs"]["freqs_cis"]
        sampled = rows(call["image_tokens"])  # image tokens come first in every row
        query = _rotate(project_heads(attn, attn.to_q, attn.norm_q, hidden[:, sampled], heads), freqs[:, sampled])
        key = _rotate(project_heads(attn, attn.to_k, attn.norm_k, hidden, heads), freqs)
        return query.transpose(1, 2), key.transpose(1, 2), mask

    # memory plan (egrpo/memory.py's docstring has the method; the counts are derived below) ------------------

    @classmethod
    def memory_shape(cls, transformer: nn.Module) -> TransformerShape:
        config = transformer.config
        blocks = [*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers]
        patch, frames = config.all_patch_size[0], config.all_f_patch_size[0]
        params, buffers = count_parameters(transformer)
        return TransformerShape(
            class_name=type(transformer).__name__, family=cls.family, params=params, buffer_elements=buffers,
            width=config.dim, heads=config.n_heads, mlp_width=transformer.layers[0].feed_forward.w1.out_features,
            blocks=(("noise_refiner", len(transformer.noise_refiner)),
                    ("context_refiner", len(transformer.context_refiner)), ("main", len(transformer.layers))),
            qk_rms_norm=bool(config.qk_norm), token_channels=config.in_channels * patch * patch * frames,
            text_width=config.cap_feat_dim, pooled_dim=0,
            largest_block_params=max(count_parameters(b)[0] for b in blocks),
            largest_parameter=max(p.numel() for p in transformer.parameters()),
        )

    @classmethod
    def saved_elements(cls, shape: TransformerShape, image_tokens: int, text_tokens: int,
                       dtype_bytes: int) -> dict[str, float]:
        """Per token of a block (`_block_saved`): 22 D + 4 F modulated (main layers, noise refiner), 18 D + 4 F
        without modulation (context refiner), + the RMS norms' fp32 copies in 16-bit dtypes, on the token counts
        rounded up to multiples of SEQ_MULTI_OF as the transformer pads them. Outside the blocks: x_embedder's input and the output
        the loss keeps (2 C per image token), the caption's RMS norm (its input and normalised copy, 2 J, + an
        fp32 copy in 16-bit), and per unified token the final layer (its norm's input, the scaled norm and the
        linear's input: 3 D) and the RoPE tables the rotations keep (the part's and the unified one: 2 d)."""
        d, f, c, j = shape.width, shape.mlp_width, shape.token_channels, shape.text_width
        image_tokens, text_tokens = _round_up(image_tokens), _round_up(text_tokens)
        modulated, plain = _block_saved(d, f, dtype_bytes, True), _block_saved(d, f, dtype_bytes, False)
        n, head = image_tokens + text_tokens, shape.width // shape.heads
        return {"noise_refiner": image_tokens * modulated, "context_refiner": text_tokens * plain,
                "main": n * modulated,
                "outside": image_tokens * 2 * c + text_tokens * (2 + fp32_copy_units(dtype_bytes)) * j
                + n * (3 * d + 2 * head)}

    @classmethod
    def inference_elements(cls, shape: TransformerShape, image_tokens: int, text_tokens: int,
                           dtype_bytes: int) -> float:
        """At a main layer's SwiGLU: w1's and w3's outputs, SiLU's output and their product (4 F); the layer's
        input (the layer loop still holds it), the residual and the modulated norm feeding w1/w3 (3 D); the
        refiners' outputs, which the forward keeps beside the unified sequence (D); the RoPE tables (3 d).
        Measured 5.9 D + 4 F per token on a 128-wide model in fp32 (tests/test_family_z_image.py); 6 D is
        used. In 16-bit dtypes the norms' and RoPE's fp32 temporaries live before the MLP, below this peak."""
        return (_round_up(image_tokens) + _round_up(text_tokens)) * (4 * shape.mlp_width + 6 * shape.width)

    @classmethod
    def token_counts(cls, transformer_config: dict[str, Any], vae_scale: int, height: int, width: int,
                     max_sequence_length: int) -> tuple[int, int]:
        """The pipeline's image_seq_len (what its schedule's mu reads, so `pipeline_sigmas` gets it) and the
        longest caption, max_sequence_length. The transformer pads each to a multiple of SEQ_MULTI_OF (32);
        the memory formulas above round them up themselves."""
        patch = transformer_config["all_patch_size"][0]
        return (height // vae_scale // patch) * (width // vae_scale // patch), max_sequence_length


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """ZSingleStreamAttnProcessor's RoPE: (B, N, h, d) as d/2 complex pairs times freqs (B, N, d/2)."""
    with torch.amp.autocast("cuda", enabled=False):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs.unsqueeze(2)).flatten(3).type_as(x)


def _round_up(tokens: int) -> int:
    return tokens + (-tokens) % SEQ_MULTI_OF


def _block_saved(d: int, f: int, dtype_bytes: int, modulation: bool) -> float:
    """Elements a ZImageTransformerBlock keeps for backward per token, read off its forward (and checked by
    listing autograd's saved tensors): its input, kept by attention_norm1 (D), and that norm's normalised copy
    (D); with modulation the norm's output, kept by the scale multiply (D); to_q/k/v's input (D); q and k and
    their normalised copies, kept by norm_q / norm_k (4 D); the rotated q and k, v and the attention output,
    which the SDPA dispatch keeps as head-major copies (4 D; RoPE keeps only its constant table); the output
    flattened from heads for to_out (D); to_out's output and its normalised copy (2 D); with modulation
    attention_norm2's output, kept by the gate multiply (D); the residual, ffn_norm1's input (D), its
    normalised copy (D), with modulation its output (D), and w1/w3's input (D); w1's and w3's outputs, SiLU's
    output and the product (4 F); w2's output and its normalised copy (2 D); with modulation ffn_norm2's output
    (D). 22 D + 4 F with modulation, 18 D + 4 F without. In 16-bit dtypes each of the six D-wide RMS norms
    (attention_norm1/2, norm_q, norm_k, ffn_norm1/2) keeps an fp32 copy of its input: 6 r D more (r =
    fp32_copy_units)."""
    return (22 if modulation else 18) * d + 4 * f + 6 * fp32_copy_units(dtype_bytes) * d


def build_z_image_pipeline(seed: int = 0) -> ZImagePipeline:
    """A tiny ZImagePipeline, deterministic given `seed` (the global torch RNG is left untouched): a 32-wide
    transformer (2 heads of 16, RoPE axes 4 + 6 + 6, one refiner layer each, two main layers) on a 16-channel VAE
    (2x), and a 2-layer Qwen3 text encoder 32 wide (its hidden_states[-2] is the first layer's output) with
    Qwen's character-level tokenizer. The transformer's other settings are Z-Image-Turbo's published ones; its
    pad tokens are random, as trained ones are not zero."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = qwen_tokenizer()
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ))
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[1536, 512, 512],
        )
        with torch.no_grad():  # learned in the real model; zeros (the init) would make every pad key alike
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
        pipe = ZImagePipeline(scheduler=fixed_shift_scheduler(), vae=tiny_vae(), text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer)
    return eval_mode(pipe)
