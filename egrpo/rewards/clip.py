"""CLIP-family rewards, CLIP score and PickScore, and the preprocessing and batch handling every CLIP-family
reward (aesthetic, HPSv2, ImageReward too) shares.

CLIP score (model `clip`, reward `clip_score`)
    Path: a transformers CLIP folder, e.g. a download of openai/clip-vit-large-patch14: config.json, the
    weights (model.safetensors or pytorch_model.bin), the tokenizer files and, optionally,
    preprocessor_config.json.
    Score: the raw cosine similarity of the image and prompt embeddings, in [-1, 1]; for CLIP ViT-L/14 about
    0.15-0.35 (above ~0.3 the image clearly shows the prompt, below ~0.2 it does not). Not the CLIPScore
    paper's 2.5 x max(cosine, 0).

PickScore (model `pickscore`, reward `pickscore`)
    Path: a download of yuvalkirstain/PickScore_v1 (a CLIPModel folder: config.json and weights) with the
    tokenizer files and preprocessor_config.json of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, PickScore's
    processor, copied into it.
    Score: exp(logit_scale) x cosine, as PickScore's own code computes it. exp(logit_scale) is 100 for
    PickScore_v1, so scores are about 18-23 for generated images; a difference of 1 between two images of the
    same prompt means people prefer the higher one with probability e/(1+e) = 0.73. It is not divided by 100
    as some RL code does: GRPO's group normalisation removes the scale anyway, and a reward weight can set it.

Prompts are tokenised as each model's reference does (egrpo.rewards.tokenization): CLIP score as OpenAI
CLIP's clip.tokenize (ftfy and HTML clean-up, lower case, zero padding to 77), PickScore with transformers'
tokenizer of its folder, called as PickScore's own code calls it.

Preprocessing is torch only (no torchvision, no PIL), on the model's device, and batched: resize with bicubic
antialiased interpolation (what PIL's bicubic resampling does), clamp to [0, 1] (as 8-bit resampling does),
centre-crop or pad to the model's square image size, and normalise with the mean and std of the folder's
preprocessor_config.json (OpenAI CLIP's when absent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from egrpo.rewards.base import weights_path
from egrpo.rewards.loading import (
    Needed,
    check_vocabulary,
    load_config,
    load_pretrained,
    load_tokenizer,
    require_files,
)
from egrpo.rewards.tokenization import ClipPrompts, PromptTokenizer, TransformersPrompts

# OpenAI CLIP's normalisation, used by CLIP, PickScore, HPSv2 and BLIP alike.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Fit = Literal["crop", "pad"]


@dataclass(frozen=True)
class ImageTransform:
    """Images (B, 3, H, W) in [0, 1] -> the (B, 3, size, size) normalised pixels a vision tower takes.

    fit="crop": resize so the shorter side is `size`, then centre-crop (CLIP's, PickScore's and BLIP's
    processors). fit="pad": resize so the longer side is `size`, then centre on a black square (HPSv2's
    evaluation transform). Both are the same for square images.
    """

    size: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    fit: Fit = "crop"

    @classmethod
    def for_folder(cls, folder: Path, size: int, fit: Fit = "crop") -> ImageTransform:
        """The transform for a model folder: mean and std from its preprocessor_config.json when present.

        The size is the model's (its config's image_size), not the processor's: the vision tower only accepts
        that size, and for released checkpoints the two agree."""
        file = folder / "preprocessor_config.json"
        if not file.exists():
            return cls(size, fit=fit)
        config = json.loads(file.read_text())
        mean = tuple(config.get("image_mean", CLIP_MEAN))
        std = tuple(config.get("image_std", CLIP_STD))
        return cls(size, mean, std, fit)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        height, width = images.shape[-2:]
        scale = self.size / (min(height, width) if self.fit == "crop" else max(height, width))
        resized = (max(1, round(height * scale)), max(1, round(width * scale)))
        if resized != (height, width):
            images = F.interpolate(images, size=resized, mode="bicubic", antialias=True, align_corners=False)
            images = images.clamp(0, 1)
        if self.fit == "crop":
            top = int(round((resized[0] - self.size) / 2))
            left = int(round((resized[1] - self.size) / 2))
            images = images[..., top : top + self.size, left : left + self.size]
        else:
            pad_h, pad_w = self.size - resized[0], self.size - resized[1]
            images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std


def split_unscorable(images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a batch, and split off what cannot be scored: (images with non-finite pixels zeroed and all
    clamped to [0, 1], (B,) bool CPU mask of the images that were finite)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    finite = images.isfinite().flatten(1).all(dim=1).cpu()
    return torch.nan_to_num(images.detach().float()).clamp(0, 1), finite


def mask_unscorable(scores: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """(B,) scores as a float32 CPU tensor, NaN where the image was not finite."""
    return torch.where(finite, scores.detach().float().cpu(), torch.tensor(float("nan")))


def embedding(output: object) -> torch.Tensor:
    """The projected embedding from CLIP's get_image_features / get_text_features: transformers 4 returns the
    tensor, transformers 5 an output holding it as `pooler_output`."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipSimilarity:
    """A CLIP-family reward: the cosine of image and prompt embeddings, times exp(logit_scale) if asked.

    `tokenize` turns prompts into the ids the model's reference would give it (egrpo.rewards.tokenization).
    See the module docstring for the scale of each reward built from it."""

    def __init__(
        self,
        name: str,
        model: CLIPModel,
        tokenize: PromptTokenizer,
        transform: ImageTransform,
        scale_by_logit: bool = False,
    ) -> None:
        self.names: tuple[str, ...] = (name,)
        self.model = model
        self.tokenize = tokenize
        self.transform = transform
        self.scale_by_logit = scale_by_logit

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        images, finite = split_unscorable(images, prompts)
        device = self.model.device
        pixels = self.transform(images.to(device))
        tokens = {key: value.to(device) for key, value in self.tokenize(prompts).items()}
        image_embeds = embedding(self.model.get_image_features(pixel_values=pixels))
        text_embeds = embedding(
            self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        )
        similarity = F.cosine_similarity(image_embeds, text_embeds, dim=-1)
        if self.scale_by_logit:
            similarity = similarity * self.model.logit_scale.exp()
        return {self.names[0]: mask_unscorable(similarity, finite)}


# What load_clip_folder reads from a `clip` or `pickscore` folder (preprocessor_config.json is optional).
CLIP_FILES = (Needed("tokenizer"), Needed("config"), Needed("weights"))


def check_clip_tokenizer(folder: Path) -> None:
    """Refuse a CLIP folder (`clip`, `pickscore`, `hpsv2`'s clip/) whose tokenizer has ids past its config's
    text_config.vocab_size; reads only the tokenizer and config.json, not the weights."""
    config = load_config(CLIPConfig, folder)
    check_vocabulary(load_tokenizer(folder), config.text_config.vocab_size, folder, _text_config(folder))


def _text_config(folder: Path) -> str:
    """Where a CLIP folder's text vocabulary size is read from, for errors."""
    return f"{folder / 'config.json'} (text_config)"


def check_clip_folder(folder: Path) -> None:
    """The pre-flight check of a `clip` or `pickscore` folder (egrpo.rewards.base.check_reward_folder): every
    file in CLIP_FILES is there and the tokenizer fits the text tower, all without loading weights."""
    require_files(folder, CLIP_FILES)
    check_clip_tokenizer(folder)


def load_clip_folder(folder: Path, device: str) -> tuple[CLIPModel, PreTrainedTokenizerBase, ImageTransform]:
    """A CLIP folder's model (eval, on `device`), tokenizer and image transform."""
    require_files(folder, CLIP_FILES)  # all found first: it fails fast, the weights may take a while
    tokenizer = load_tokenizer(folder)
    model = load_pretrained(CLIPModel, folder, device)
    check_vocabulary(tokenizer, model.config.text_config.vocab_size, folder, _text_config(folder))
    return model, tokenizer, ImageTransform.for_folder(folder, model.config.vision_config.image_size)


def load_clip_score(path: str | None, device: str) -> ClipSimilarity:
    """The `clip` reward model (reward `clip_score`); see the module docstring for the layout and scale.
    Prompts are tokenised as OpenAI CLIP's clip.tokenize(truncate=True), which the model was trained with."""
    model, tokenizer, transform = load_clip_folder(weights_path("clip", path), device)
    tokenize = ClipPrompts(tokenizer, context_length=model.config.text_config.max_position_embeddings)
    return ClipSimilarity("clip_score", model, tokenize, transform)


def load_pickscore(path: str | None, device: str) -> ClipSimilarity:
    """The `pickscore` reward model (reward `pickscore`); the module docstring gives the layout and scale.
    Prompts are tokenised by the folder's transformers tokenizer as PickScore's own code calls its processor
    (padding=True, truncation=True, max_length=77), which is also how PickScore was trained."""
    model, tokenizer, transform = load_clip_folder(weights_path("pickscore", path), device)
    tokenize = TransformersPrompts(tokenizer, max_length=model.config.text_config.max_position_embeddings)
    return ClipSimilarity("pickscore", model, tokenize, transform, scale_by_logit=True)
