"""Tiny twins of the reward models: real transformers classes with random weights, a few hundred kB each,
saved in the same folder layouts as the released checkpoints, so tests (and toy configs) load them through the
code path real weights take. A saved twin scores deterministically, but its scores carry no meaning.

The CLIP text side and its character-level tokenizer are the ones `egrpo.models.tiny` builds for the tiny
FLUX and SD3 pipelines; the loaders read the tokenizer saved beside each twin, as they do for real weights.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    BertTokenizer,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
)

from egrpo.models.tiny import clip_config, clip_tokenizer
from egrpo.rewards.aesthetic import ScoreHead
from egrpo.rewards.clip import CLIP_MEAN, CLIP_STD
from egrpo.rewards.imagereward import HEAD_WIDTH, VISION_LAYER_NORM_EPS, text_config_from_med

IMAGE_SIZE = 32
WIDTH = 32  # hidden size of both towers and the projection width


def build_tiny_clip(seed: int = 0, tokenizer: CLIPTokenizer | None = None) -> tuple[CLIPModel, CLIPTokenizer]:
    """A tiny CLIPModel (32 wide, 2 layers per tower, 32 px images in 8 px patches) and its tokenizer, in eval
    mode; the weights are deterministic given `seed` (the global torch RNG is left untouched). The tokenizer
    is the character-level one unless given: tests of prompt tokenisation pass one with CLIP's real
    vocabulary, and the text tower is sized to it."""
    tokenizer = clip_tokenizer() if tokenizer is None else tokenizer
    config = CLIPConfig(
        text_config=clip_config(tokenizer, hidden_size=WIDTH).to_dict(),
        vision_config={
            "hidden_size": WIDTH,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=WIDTH,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model.eval(), tokenizer


def save_clip_folder(model: CLIPModel, tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Save a CLIP model as a transformers folder like a hub download: config, safetensors weights, tokenizer
    and a CLIPImageProcessor's preprocessor_config.json (written directly: the processor class itself wants
    torchvision or PIL)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    size = model.config.vision_config.image_size
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def save_tiny_clip(folder: Path, seed: int = 0) -> CLIPModel:
    """A tiny CLIP folder, the layout of the `clip` and `pickscore` reward paths; returns the model saved."""
    model, tokenizer = build_tiny_clip(seed)
    save_clip_folder(model, tokenizer, folder)
    return model


def save_tiny_aesthetic(
    folder: Path, seed: int = 0, head_suffix: str = ".safetensors"
) -> tuple[CLIPModel, ScoreHead]:
    """A tiny `aesthetic` reward folder: `clip/` and a head file with the released key names, as safetensors
    or (head_suffix ".pth") a torch pickle like sac+logos+ava1-l14-linearMSE.pth. Returns what was saved."""
    model = save_tiny_clip(folder / "clip", seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        head = ScoreHead(model.config.projection_dim).eval()
    state = {key: value.contiguous() for key, value in head.state_dict().items()}
    file = folder / f"aesthetic_head{head_suffix}"
    if head_suffix == ".safetensors":
        save_file(state, file)
    else:
        torch.save(state, file)
    return model, head


def build_tiny_imagereward(
    seed: int = 0,
) -> tuple[BlipVisionModel, BlipTextModel, ScoreHead, BertTokenizer, dict]:
    """The parts of a tiny ImageReward, in eval mode and deterministic given `seed`: a BLIP ViT (128 wide, so
    two 64-wide heads like BLIP's, 2 layers, 32 px images in 8 px patches), a BERT text encoder (32 wide,
    2 layers) cross-attending to it, the head, a word-piece tokenizer with BLIP's added [DEC] and [ENC]
    tokens, and the text encoder's med_config.json contents."""
    tokenizer = _bert_tokenizer()
    med = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": len(tokenizer),
        "hidden_size": WIDTH,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": tokenizer.pad_token_id,
        "add_cross_attention": True,
        "encoder_width": 768,  # as in BLIP's file; the loader uses the ViT's width instead
    }
    vision_config = BlipVisionConfig(
        hidden_size=2 * HEAD_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        initializer_range=0.02,  # BLIP's default (1e-10) would make a random tower near zero
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = BlipVisionModel(vision_config)
        text = BlipTextModel(text_config_from_med(med, vision_config.hidden_size), add_pooling_layer=False)
        head = ScoreHead(WIDTH)
    return vision.eval(), text.eval(), head.eval(), tokenizer, med


def _bert_tokenizer() -> BertTokenizer:
    """A lower-case word-piece tokenizer over single characters (word-initial and ## continuations), with the
    [DEC] and [ENC] tokens BLIP adds to bert-base-uncased's."""
    pieces = [*string.ascii_lowercase, *string.digits, *",.-'!?"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *(f"##{p}" for p in pieces)]
    tokenizer = BertTokenizer(vocab={piece: i for i, piece in enumerate(vocab)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer
