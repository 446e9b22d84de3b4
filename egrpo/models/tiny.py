"""Tiny models of the real diffusers/transformers classes, built in code and saved in the real on-disk format.

They let the whole stack (loading, sampling, training, LoRA files) run offline on a CPU in seconds, while every
code path is the one a real FLUX or SD3 checkpoint takes. Tokenizers are built without the model hub: CLIP is
character-level over the byte-level alphabet, T5 is a unigram model with one token per known word and a
character fallback. Sizes follow /work/shared/ENV.md section 4.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

EGRPO_SETTINGS_FILE = "egrpo.json"

# FLUX and SD3 both sample with a fixed shift of 3 in egrpo (ALGORITHMS.md section 1). Dynamic,
# resolution-dependent shifting is off so that diffusers' own schedule equals egrpo's sigma_schedule.
SCHEDULE_SHIFT = 3.0

# The T5 character fallback: any prompt made of these characters tokenizes without <unk>.
_T5_FALLBACK_CHARS = string.ascii_letters + string.digits + ",.-'!?"


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
        t5_tokenizer = _t5_tokenizer(words or [])
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
            scheduler=_scheduler(),
            vae=_vae() if vae else None,
            text_encoder=CLIPTextModel(clip_config(text_tokenizer, hidden_size=text_dim)),
            tokenizer=text_tokenizer,
            text_encoder_2=T5EncoderModel(_t5_config(t5_tokenizer, d_model=text_dim)),
            tokenizer_2=t5_tokenizer,
            transformer=transformer,
        )
    return _eval(pipe)


def build_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A tiny StableDiffusion3Pipeline (two projecting CLIP encoders + T5), deterministic given `seed`.

    SD3 concatenates the two CLIPs' hidden states (2 x 16 = 32 wide) and pads them to T5's width (32), and
    concatenates their pooled projections (2 x 32 = 64) as the pooled conditioning.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2, t5_tokenizer = clip_tokenizer(), clip_tokenizer(), _t5_tokenizer([])
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
            scheduler=_scheduler(),
            vae=_vae(),
            text_encoder=CLIPTextModelWithProjection(clip_config(tokenizer, hidden_size=16)),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer_2, hidden_size=16)),
            tokenizer_2=tokenizer_2,
            text_encoder_3=T5EncoderModel(_t5_config(t5_tokenizer, d_model=32)),
            tokenizer_3=t5_tokenizer,
        )
    return _eval(pipe)


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
        tokenizer, tokenizer_2, t5_tokenizer = clip_tokenizer(), clip_tokenizer(), _t5_tokenizer([])
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
        vae = _vae(block_out_channels=(8, 8, 16, 16))  # three downsamplings: 8x, as SD3's VAE
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=_scheduler(),
            vae=vae,
            text_encoder=text_encoders[0],
            tokenizer=tokenizer,
            text_encoder_2=text_encoders[1],
            tokenizer_2=tokenizer_2,
            text_encoder_3=T5EncoderModel(_t5_config(t5_tokenizer, d_model=joint_attention_dim)),
            tokenizer_3=t5_tokenizer,
        )
    return _eval(pipe)


def save_pipeline(
    pipe: DiffusionPipeline,
    path: str | Path,
    *,
    height: int,
    width: int,
    pixel_unshuffle: int | None = None,
    max_sequence_length: int | None = None,
) -> None:
    """Save `pipe` as a diffusers folder (safetensors) plus `egrpo.json`, egrpo's defaults for that folder.

    `egrpo.json` holds the image size to sample at, the T5 prompt length (None: 512) and, for a pipeline
    without a VAE, the pixel-unshuffle factor that defines its pixel latents. diffusers saves a missing VAE as `"vae": [null, null]` in
    model_index.json (logging "self.vae=None ... cannot be saved", which is harmless), but its
    `from_pretrained` then refuses the folder unless `vae=None` is passed explicitly;
    `FlowPolicy.from_pretrained` does that for every null component.
    """
    if getattr(pipe, "vae", None) is None and pixel_unshuffle is None:
        raise ValueError("a pipeline without a VAE needs `pixel_unshuffle` to define its pixel latents")
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    settings = {"height": height, "width": width, "pixel_unshuffle": pixel_unshuffle,
                "max_sequence_length": max_sequence_length}
    (path / EGRPO_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def _eval(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Freshly constructed modules are in train mode; T5's dropout would make every encoding random."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE dims for FLUX's (text, row, column) position axes: even, summing to the head dim, row = column."""
    if head_dim % 2:
        raise ValueError(f"attention_head_dim must be even for rotary embeddings, got {head_dim}")
    first = 2 * (head_dim // 8)
    rest = head_dim - first
    second = 2 * (rest // 4)
    return first, second, rest - second


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=SCHEDULE_SHIFT, use_dynamic_shifting=False)


def _vae(block_out_channels: tuple[int, ...] = (8, 16)) -> AutoencoderKL:
    """A 16-channel VAE with SD3's shift and scale; each block after the first halves the resolution."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    )


def clip_tokenizer() -> CLIPTokenizer:
    """Character-level CLIP tokenizer: every byte-level character, alone and as a word end; no merges."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(ByteLevel.alphabet()):  # a set: sorted, so every call builds the same vocabulary
        for piece in (char, char + "</w>"):
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def clip_config(tokenizer: CLIPTokenizer, *, hidden_size: int) -> CLIPTextConfig:
    # Without explicit special ids CLIP assumes OpenAI's (49406, 49407) and pools on the wrong token.
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_tokenizer(words: list[str]) -> T5Tokenizer:
    """Unigram T5 tokenizer: each of `words` is one token (it outscores any character split), and single
    characters, word-initial or not, cover everything else in `_T5_FALLBACK_CHARS`."""
    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for word in words:
        scores.setdefault("▁" + word, -1.0)
    for char in _T5_FALLBACK_CHARS:
        scores.setdefault("▁" + char, -3.0)
        scores.setdefault(char, -4.0)
    return T5Tokenizer(vocab=list(scores.items()), extra_ids=0)


def _t5_config(tokenizer: T5Tokenizer, *, d_model: int) -> T5Config:
    return T5Config(
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        vocab_size=len(tokenizer),
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
