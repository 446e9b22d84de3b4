"""The LAION aesthetic predictor (model `aesthetic`, reward `aesthetic`): a linear MLP head on the normalised
CLIP ViT-L/14 image embedding, trained to predict the mean human rating of an image (the prompt is unused).

Path layout (a folder):

    <path>/clip/                               a CLIP ViT-L/14 transformers folder, e.g. a download (or a
                                               symlink to one) of openai/clip-vit-large-patch14; only its
                                               vision tower and visual projection are loaded
    <path>/sac+logos+ava1-l14-linearMSE.pth    the head, from christophschuhmann/improved-aesthetic-predictor;
                                               any one file named *.pth, *.pt, *.bin or *.safetensors with the
                                               same keys (layers.{0,2,4,6,7}.{weight,bias}) works

Score: the predicted rating on the AVA 1-10 scale; most images land in 4-7, generated images typically
5-6.5, and above ~6.5 is what LAION-Aesthetics keeps as "aesthetic".
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPVisionModelWithProjection

from egrpo.rewards.base import weights_path
from egrpo.rewards.clip import ImageTransform, mask_unscorable, split_unscorable
from egrpo.rewards.loading import (
    Needed,
    load_checkpoint_file,
    load_config,
    load_pretrained,
    load_state,
    require_files,
    single_checkpoint,
)

# What load_aesthetic reads (the module docstring's layout): clip/'s vision tower and its weights; no tokenizer.
AESTHETIC_FILES = (
    Needed("checkpoint", what="the aesthetic head"),
    Needed("config", "clip"),
    Needed("weights", "clip"),
)


class ScoreHead(nn.Module):
    """The improved-aesthetic-predictor MLP: 5 linear layers with dropout and no activations between them
    (so, in eval mode, one affine map), `dim` -> 1. ImageReward's head has the same layout on BLIP features.

    Its parameter names (layers.0, .2, .4, .6, .7) are those of the released files."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, dim) -> (B,)"""
        return self.layers(features).squeeze(-1)


class AestheticReward:
    """The LAION aesthetic score of each image; see the module docstring for the scale."""

    names: tuple[str, ...] = ("aesthetic",)

    def __init__(
        self, vision: CLIPVisionModelWithProjection, head: ScoreHead, transform: ImageTransform
    ) -> None:
        self.vision = vision
        self.head = head
        self.transform = transform

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        images, finite = split_unscorable(images, prompts)
        pixels = self.transform(images.to(self.vision.device))
        embeds = F.normalize(self.vision(pixel_values=pixels).image_embeds, dim=-1)
        return {"aesthetic": mask_unscorable(self.head(embeds), finite)}


def check_aesthetic_folder(folder: Path) -> None:
    """The pre-flight check of an `aesthetic` folder (egrpo.rewards.base.check_reward_folder): AESTHETIC_FILES
    are there. The predictor reads no prompt, so there is no tokenizer to check."""
    require_files(folder, AESTHETIC_FILES)


def load_aesthetic(path: str | None, device: str) -> AestheticReward:
    """The `aesthetic` reward model from the folder layout in the module docstring."""
    folder = weights_path("aesthetic", path)
    require_files(folder, AESTHETIC_FILES)
    head_file = single_checkpoint(folder)
    clip_folder = folder / "clip"
    # A vision-only config from the full CLIP one: the projection width lives at the top level of CLIPConfig.
    config = load_config(CLIPConfig, clip_folder)
    vision_config = config.vision_config
    vision_config.projection_dim = config.projection_dim
    vision = load_pretrained(CLIPVisionModelWithProjection, clip_folder, device, config=vision_config)
    head = ScoreHead(config.projection_dim)
    load_state(head, load_checkpoint_file(head_file), head_file)
    transform = ImageTransform.for_folder(clip_folder, vision_config.image_size)
    return AestheticReward(vision, head.to(device).eval(), transform)
