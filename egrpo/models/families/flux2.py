"""FLUX.2 (Flux2KleinPipeline and Flux2Pipeline, Flux2Transformer2DModel, AutoencoderKLFlux2): one class for
FLUX.2 [klein] (Qwen3 text encoder; the base models take true CFG, the step-distilled ones nothing) and FLUX.2
[dev] (Mistral Small 3.x text encoder; guidance-distilled, an embedded guidance value). diffusers 0.42.

- Prompts: the pipeline's own `encode_prompt`. klein renders Qwen3's chat template (a user turn, the generation
  prompt, `enable_thinking=False`) and stacks Qwen3's hidden states 9, 18 and 27; dev renders Mistral's with
  FLUX.2's system message and stacks layers 10, 20 and 30. Either pads (or truncates) to max_sequence_length
  and feeds every one of those tokens to the transformer, padding included and with no attention mask: there
  is nothing to trim, so `_call` passes all max_sequence_length text tokens, as the pipelines do. Text
  position ids are 4-D (t, h, w, l) = (0, 0, 0, token index), shared by the batch.
- Latents: `prepare_latents` draws the noise already *patchified*, (4 C, H / 16, W / 16) for the 8x VAE
  (2x2 latent patches in the channels), and packs it to (tokens, 4 C); image ids are (0, row, column, 0). The
  VAE's latents are normalised by its BatchNorm's running statistics in the patchified layout:
  z = (patchify(mode) - running_mean) / sqrt(running_var + batch_norm_eps), undone before `vae.decode`.
- Transformer: timestep = the scheduler's t / 1000 = sigma (the model multiplies it by 1000 again); dev passes
  `guidance` = its guidance_scale (egrpo's `guidance`) to the guidance embedding, klein passes none. klein's
  CFG (base models, guidance_scale > 1) is linear, the negative prompt "": FlowPolicy's default; the pipeline
  turns CFG off for step-distilled checkpoints (model_index.json `is_distilled`), and so does this class.
- Schedule: sigmas = linspace(1, 1/T, T), shifted by the scheduler with mu = compute_empirical_mu(image tokens,
  T) (FLUX.2's fit of the shift to resolution and step count; the scheduler config's base/max shift are unused).
- Probe: double-stream blocks (`Flux2AttnProcessor`): joint order [text, image], the text stream through
  `add_*_proj` and `norm_added_*`. Single-stream blocks (`Flux2ParallelSelfAttnProcessor`): one fused
  `to_qkv_mlp_proj` makes Q, K, V and the MLP input of the joint sequence; Q and K are its first and second
  D-wide column blocks, and only those columns are computed here. The image rows are the last N_img rows,
  N_img the token count of the transformer's `hidden_states` (`probe_call`). Per-head RMS q/k norms, then
  RoPE over the joint sequence; SDPA's default scale, no mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from peft.tuners.lora import Linear as LoraLinear
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from egrpo.entropy.attention import rotate
from egrpo.memory import TransformerShape, count_parameters, fp32_copy_units
from egrpo.models.policy import ATTENTION_PROJECTIONS, FlowPolicy
from egrpo.models.tiny import eval_mode, qwen_tokenizer

# The single-stream blocks fuse attention and MLP: `to_qkv_mlp_proj` (Q, K, V and the MLP input) and `attn.to_out`
# (attention output and MLP output). Their `attn.to_out` is a Linear, the double-stream blocks' a ModuleList
# (whose Linear is `to_out.0`), so the single blocks' are named one by one, as diffusers' FLUX.2 LoRA scripts do:
# for the most single blocks a published FLUX.2 has (dev: 48; klein 4B: 20, 9B: 24).
MAX_SINGLE_BLOCKS = 48
SINGLE_BLOCK_PROJECTIONS: tuple[str, ...] = (
    "to_qkv_mlp_proj", *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(MAX_SINGLE_BLOCKS)),
)
MLP_PROJECTIONS = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
# The real scheduler config of the FLUX.2 checkpoints (diffusers' convert_flux2_to_diffusers.py copies FLUX.1-dev's):
# dynamic shifting, which the pipelines drive with compute_empirical_mu; `shift` and base/max shift are unused.
SCHEDULER_CONFIG = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}


class Flux2Policy(FlowPolicy):
    family = "flux2"
    default_schedule = "pipeline"  # the pipeline's own scheduler, as the public RL code for this family samples
    text_encoder_names = ("text_encoder",)
    # "attention" covers the single blocks' fused projections, so it adapts their MLP halves too; "flux2" adds
    # the double blocks' MLPs.
    lora_presets = {"attention": ATTENTION_PROJECTIONS + SINGLE_BLOCK_PROJECTIONS,
                    "flux2": ATTENTION_PROJECTIONS + SINGLE_BLOCK_PROJECTIONS + MLP_PROJECTIONS}
    supports_cfg = True  # klein's base models; refused for dev and the step-distilled klein models
    tiny_settings = {"height": 32, "width": 32, "max_sequence_length": 64}  # Qwen's chat template: ~26 tokens

    def __init__(self, pipe: Flux2KleinPipeline | Flux2Pipeline, **kwargs: Any) -> None:
        self.klein = isinstance(pipe, Flux2KleinPipeline)
        cfg_scale = kwargs.get("cfg_scale", 1.0)
        if cfg_scale != 1.0 and not (self.klein and not pipe.config.is_distilled):
            kind = "a step-distilled FLUX.2 [klein]" if self.klein else "FLUX.2 [dev] (guidance-distilled)"
            raise ValueError(f"classifier-free guidance (cfg_scale={cfg_scale}) does not apply to {kind}; "
                             "only the klein base models take it" + ("" if self.klein else "; set `guidance`"))
        super().__init__(pipe, **kwargs)

    @classmethod
    def default_size(cls, transformer_config: dict[str, Any], vae_scale: int) -> int:
        return 128 * vae_scale  # both pipelines' default_sample_size: 1024 px with the 8x VAE

    def _latent_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        side = 2 * self.pipe.vae_scale_factor  # one token: a 2x2 patch of latent pixels
        if self.height % side or self.width % side:
            raise ValueError(f"height and width must be multiples of {side}, got {self.height}x{self.width}")
        channels = self.transformer.config.in_channels // 4 * 4  # prepare_latents: (in_channels // 4) * 4
        rows, columns = self.height // side, self.width // side
        ids = self.pipe._prepare_latent_ids(torch.empty(1, channels, rows, columns, device="meta"))
        self._img_ids = ids[0].to(self.device)
        # every prompt is padded to max_sequence_length, so one (length, 4) table of text ids serves every call
        self._txt_ids = self.pipe._prepare_text_ids(torch.empty(1, self.max_sequence_length, 1))[0].to(self.device)
        return (channels, rows, columns), (rows * columns, channels)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds}

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe._pack_latents(latents)

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, tokens, C) to (B, C, rows, columns): `_unpack_latents_with_ids` for the row-major image ids."""
        _, rows, columns = self._noise_shape
        return latents.unflatten(1, (rows, columns)).permute(0, 3, 1, 2)

    def _bn_statistics(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent normalisation: BatchNorm's running mean and sqrt(running var + eps), (1, 4 C, 1, 1)."""
        bn = self.pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.pipe.vae.config.batch_norm_eps).to(dtype)
        return mean, std

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        mean, std = self._bn_statistics(vae.dtype)
        latents = self.pipe._unpatchify_latents(latents.to(vae.dtype) * std + mean)
        return vae.decode(latents, return_dict=False)[0].float()

    def _vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = self.pipe._patchify_latents(vae.encode(images.to(vae.dtype)).latent_dist.mode())
        mean, std = self._bn_statistics(vae.dtype)
        return ((latents - mean) / std).float()

    def _call(self, model: nn.Module, hidden: torch.Tensor, sigma: torch.Tensor,
              cond: dict[str, torch.Tensor]) -> torch.Tensor:
        embeds = cond["prompt_embeds"].to(self.dtype)
        # The pipelines pass the scheduler's t = 1000 sigma, in the model's dtype, divided by 1000.
        timestep = (sigma * 1000).to(self.dtype) / 1000
        guidance = None if self.klein else torch.full_like(sigma, self.guidance)
        return model(
            hidden_states=hidden,
            timestep=timestep,
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=self._txt_ids,
            img_ids=self._img_ids,
            return_dict=False,
        )[0]

    @classmethod
    def tiny_pipeline(cls, seed: int = 0) -> Flux2KleinPipeline:
        """FLUX.2 [klein] base's kind: Qwen3, no guidance embedding, true CFG available."""
        return build_flux2_klein_pipeline(seed=seed)

    @classmethod
    def pipeline_sigmas(cls, scheduler_config: dict[str, Any], steps: int, image_tokens: int) -> torch.Tensor:
        """Step 6 of both FLUX.2 pipelines: sigmas = linspace(1, 1/T, T) (none if the scheduler has
        `use_flow_sigmas`) and mu = compute_empirical_mu(image tokens, T), which the scheduler uses with
        `use_dynamic_shifting` (the FLUX.2 checkpoints: yes), else it applies `shift`."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        mu = compute_empirical_mu(image_seq_len=image_tokens, num_steps=steps)
        if scheduler.config.get("use_flow_sigmas"):
            scheduler.set_timesteps(steps, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return scheduler.sigmas.double()

    # entropy probe ---------------------------------------------------------------------------------------

    @classmethod
    def attention_modules(cls, transformer: nn.Module) -> list[nn.Module]:
        return [block.attn for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]]

    @classmethod
    def check_probe_support(cls, attn: nn.Module) -> None:
        supported = Flux2ParallelSelfAttnProcessor if hasattr(attn, "to_qkv_mlp_proj") else Flux2AttnProcessor
        if type(attn.processor) is not supported:
            raise TypeError(f"the entropy probe reads {supported.__name__}'s Q/K, not {type(attn.processor).__name__}")

    @classmethod
    def probe_call(cls, transformer_inputs: dict[str, Any]) -> dict[str, Any]:
        return {"image_tokens": transformer_inputs["hidden_states"].shape[1]}

    @classmethod
    def probe_query_key(cls, attn: nn.Module, inputs: dict[str, Any], call: dict[str, Any],
                        rows: Callable[[int], torch.Tensor], heads: tuple[int, ...]
                        ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Q of the sampled image rows and all of K, as the FLUX.2 processors make them (module docstring)."""
        if inputs.get("attention_mask") is not None:
            raise ValueError("the attention entropy probe does not support attention masks")
        hidden = inputs["hidden_states"]
        selected = list(heads) if heads else list(range(attn.heads))
        if hasattr(attn, "to_qkv_mlp_proj"):  # single-stream: hidden_states is the joint sequence
            text_tokens = hidden.shape[1] - call["image_tokens"]
            sampled = rows(call["image_tokens"])
            width = attn.inner_dim  # the fused projection's columns: [Q | K | V | MLP]
            key = _fused_heads(attn, hidden, width, selected, attn.norm_k)
            query = _fused_heads(attn, hidden[:, text_tokens + sampled], 0, selected, attn.norm_q)
        else:  # double-stream: hidden_states is the image stream, encoder_hidden_states the text stream
            text = inputs["encoder_hidden_states"]
            text_tokens = text.shape[1]
            sampled = rows(hidden.shape[1])
            key = torch.cat([_heads(attn, attn.add_k_proj(text), selected, attn.norm_added_k),
                             _heads(attn, attn.to_k(hidden), selected, attn.norm_k)], dim=1)
            query = _heads(attn, attn.to_q(hidden[:, sampled]), selected, attn.norm_q)
        query, key = rotate(query, key, inputs.get("image_rotary_emb"), sampled + text_tokens)
        return query.transpose(1, 2), key.transpose(1, 2), None

    # memory plan (egrpo/memory.py's docstring has the formulas) ---------------------------------------------

    @classmethod
    def memory_shape(cls, transformer: nn.Module) -> TransformerShape:
        config = transformer.config
        joint, single = list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)
        mlp_width = single[0].attn.mlp_hidden_dim if single else joint[0].ff.linear_out.in_features
        params, buffers = count_parameters(transformer)
        return TransformerShape(
            class_name=type(transformer).__name__, family=cls.family, params=params, buffer_elements=buffers,
            width=config.num_attention_heads * config.attention_head_dim, heads=config.num_attention_heads,
            mlp_width=mlp_width, blocks=(("joint", len(joint)), ("single", len(single))), qk_rms_norm=True,
            token_channels=config.in_channels, text_width=config.joint_attention_dim, pooled_dim=0,
            largest_block_params=max(count_parameters(b)[0] for b in joint + single),
            largest_parameter=max(p.numel() for p in transformer.parameters()),
        )

    @classmethod
    def saved_elements(cls, shape: TransformerShape, image_tokens: int, text_tokens: int,
                       dtype_bytes: int) -> dict[str, float]:
        """Per token, from the block code (F = the MLP width, 3 D in every FLUX.2; r: fp32 copies, 2 in 16-bit):
        double-stream: 12 D (the modulated norm1 input and its norm, the roped Q and K, V and the attention
        output SDPA keeps, the out-projection's output for the gate, the residual, norm2, its modulation, the
        MLP output, the block output) + 4 F (SwiGLU: linear_in's 2 F output, silu's F, the product's F)
        + (4 + 2 r) D (the per-head RMS norms: their inputs q, k and normalised values);
        single-stream: 11 D (norm, modulation, roped Q and K, attention output, the out-projection's output,
        the block output, and the D part of the [attention, MLP] concatenation) + 4 F (the fused projection's
        2 F MLP part, silu's F, the concatenation's F; its 3 D of Q, K, V are in the 11 D) + (2 + 3 r) D (the
        norms' normalised values; r measured: 3 r D in 16-bit);
        outside: per image token C (the input) + 3 D (x_embedder's output, norm_out and its modulation), per
        text token D (context_embedder's output), and the [text, image] concatenation before the single blocks
        D per token. Measured fp32 / bf16 per token: 28.2 / 32.3 D (double), 25.1 / 31.2 D (single)."""
        d, f, n = shape.width, shape.mlp_width, image_tokens + text_tokens
        r = fp32_copy_units(dtype_bytes)
        return {"joint": n * (12 * d + 4 * f + (4 + 2 * r) * d),
                "single": n * (11 * d + 4 * f + (2 + 3 * r) * d),
                "outside": image_tokens * (shape.token_channels + 3 * d) + text_tokens * d + n * d}

    @classmethod
    def inference_elements(cls, shape: TransformerShape, image_tokens: int, text_tokens: int,
                           dtype_bytes: int) -> float:
        """The single-stream block at its out-projection, per token: the block input, the modulated norm, the
        fused projection (3 D + 2 F, alive while V and the MLP half are), the roped Q and K, the attention
        output, the SwiGLU output F, the [attention, MLP] concatenation D + F and its projection: 4 F + 10 D,
        + RoPE's temporaries (measured 0.5 D, 1.5 D in 16-bit)."""
        n = image_tokens + text_tokens
        return n * (4 * shape.mlp_width + (11.5 if dtype_bytes < 4 else 10.5) * shape.width)

    @classmethod
    def token_counts(cls, transformer_config: dict[str, Any], vae_scale: int, height: int, width: int,
                     max_sequence_length: int) -> tuple[int, int]:
        """Every padded text token goes into the transformer (the pipelines neither trim nor mask them)."""
        return (height // vae_scale // 2) * (width // vae_scale // 2), max_sequence_length


def _heads(attn: nn.Module, projected: torch.Tensor, heads: list[int], norm: nn.Module) -> torch.Tensor:
    """(B, N, heads, d): a D-wide projection split into heads of attn.head_dim, the selected ones normed."""
    return norm(projected.unflatten(-1, (-1, attn.head_dim))[:, :, heads])


def _fused_heads(attn: nn.Module, x: torch.Tensor, start: int, heads: list[int], norm: nn.Module) -> torch.Tensor:
    """The selected heads of the D-wide column block at `start` of the single block's fused projection of x
    (Q at 0, K at D), normed: only those columns of `to_qkv_mlp_proj` are computed."""
    columns = torch.cat([torch.arange(start + h * attn.head_dim, start + (h + 1) * attn.head_dim) for h in heads])
    projected = _linear_columns(attn.to_qkv_mlp_proj, x, columns.to(x.device))
    return norm(projected.unflatten(-1, (len(heads), attn.head_dim)))


def _linear_columns(linear: nn.Module, x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """linear(x)[..., columns], computing only those output columns, for a plain nn.Linear and for peft's
    (unmerged, plain) LoRA Linear on one; any other module is called whole and sliced."""
    base = getattr(linear, "base_layer", linear)
    lora = isinstance(linear, LoraLinear) and not linear.merged and not linear.lora_variant
    if type(base) is not nn.Linear or (linear is not base and not lora):
        return linear(x)[..., columns]
    out = F.linear(x, base.weight[columns], None if base.bias is None else base.bias[columns])
    if linear is base or linear.disable_adapters:
        return out
    for name in linear.active_adapters:  # peft's Linear.forward: base(x) + lora_B(lora_A(dropout(x))) * scaling
        if name not in linear.lora_A:
            continue
        lora_a, lora_b = linear.lora_A[name], linear.lora_B[name]
        down = lora_a(linear.lora_dropout[name](x.to(lora_a.weight.dtype)))
        bias = None if lora_b.bias is None else lora_b.bias[columns]
        out = out + (F.linear(down, lora_b.weight[columns], bias) * linear.scaling[name]).to(out.dtype)
    return out


def build_flux2_klein_pipeline(
    *,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    text_hidden_size: int = 16,
    text_layers: int = 28,
    guidance_embeds: bool = False,
    is_distilled: bool = False,
    seed: int = 0,
) -> Flux2KleinPipeline:
    """A tiny Flux2KleinPipeline, deterministic given `seed` (the global torch RNG is left untouched).

    Qwen3 has `text_layers` layers, 28 so that the stacked hidden states 9, 18, 27 are intermediate ones as in
    Qwen3-4B/8B (36 layers); the transformer reads 3 x `text_hidden_size` text channels. The VAE downsamples 2x into 4
    channels (16 per token) and its BatchNorm statistics are random, so the latent normalisation is not the
    identity. `is_distilled=False` is a klein base model (true CFG), True a step-distilled one.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = qwen_tokenizer()
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=text_hidden_size, intermediate_size=32, num_hidden_layers=text_layers,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        ))
        vae = AutoencoderKLFlux2(
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        )
        with torch.no_grad():
            vae.bn.running_mean.normal_(0.0, 0.5)
            vae.bn.running_var.uniform_(0.5, 2.0)
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * vae.config.latent_channels,  # 2x2 patchified latents
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=3 * text_hidden_size,  # three stacked Qwen3 layers
            timestep_guidance_channels=32,
            axes_dims_rope=(attention_head_dim // 4,) * 4,  # (t, h, w, l)
            guidance_embeds=guidance_embeds,
        )
        pipe = Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=is_distilled,
        )
    return eval_mode(pipe)
