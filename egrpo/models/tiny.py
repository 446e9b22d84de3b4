"""The parts of tiny models that several families share, built in code, and saving them in the real format.

Each family's file (egrpo/models/families/) builds its tiny twin from the real diffusers/transformers classes
with these parts; `save_pipeline` writes it as a diffusers folder that loads through the same code as the real
checkpoint, so the whole stack (loading, sampling, training, LoRA files) runs offline on a CPU in seconds.
Tokenizers are built without the model hub: CLIP is character-level over the byte-level alphabet, T5 a unigram
model with one token per known word and a character fallback, Qwen's (Qwen2.5-VL, Qwen3) character-level
byte-level BPE. Sizes follow /work/shared/ENV.md section 4.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTokenizer,
    Qwen2TokenizerFast,
    T5Config,
    T5Tokenizer,
)

EGRPO_SETTINGS_FILE = "egrpo.json"

# FLUX and SD3 both sample with a fixed shift of 3 in egrpo (ALGORITHMS.md section 1). Dynamic,
# resolution-dependent shifting is off so that diffusers' own schedule equals egrpo's sigma_schedule.
SCHEDULE_SHIFT = 3.0

# The T5 character fallback: any prompt made of these characters tokenizes without <unk>.
_T5_FALLBACK_CHARS = string.ascii_letters + string.digits + ",.-'!?"


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


def eval_mode(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Freshly constructed modules are in train mode; T5's dropout would make every encoding random."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def fixed_shift_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=SCHEDULE_SHIFT, use_dynamic_shifting=False)


def tiny_vae(block_out_channels: tuple[int, ...] = (8, 16)) -> AutoencoderKL:
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


# Qwen's special tokens (Qwen2.5-VL's and Qwen3's tokenizers share them) and Qwen3's chat template, trimmed to
# what the pipelines render: system / user / assistant turns, the generation prompt, and `enable_thinking`
# (False adds the empty think block, as Qwen3's template does).
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def qwen_tokenizer(model_max_length: int = 1024) -> Qwen2TokenizerFast:
    """Character-level Qwen2 tokenizer (Qwen2.5-VL's and Qwen3's class): byte-level BPE over the byte alphabet
    with no merges, Qwen's special tokens and chat template; pads with <|endoftext|> on the right, as Qwen's."""
    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                   unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def t5_tokenizer(words: list[str]) -> T5Tokenizer:
    """Unigram T5 tokenizer: each of `words` is one token (it outscores any character split), and single
    characters, word-initial or not, cover everything else in `_T5_FALLBACK_CHARS`."""
    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for word in words:
        scores.setdefault("▁" + word, -1.0)
    for char in _T5_FALLBACK_CHARS:
        scores.setdefault("▁" + char, -3.0)
        scores.setdefault(char, -4.0)
    return T5Tokenizer(vocab=list(scores.items()), extra_ids=0)


def t5_config(tokenizer: T5Tokenizer, *, d_model: int) -> T5Config:
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
