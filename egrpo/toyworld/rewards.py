"""Programmatic rewards for the toy world: does the image show the prompt's colour, shape and position?

Each reward reads the image's *foreground*, the pixels far from the background colour, and scores one
attribute in [0, 1] (higher is better):

- toy_colour: mean over foreground pixels of how close each is to the line from the background to the requested
  colour, times how far along that line it reaches (a pixel at 60% of the requested colour scores 0.6; another
  palette colour scores 0).
- toy_shape: IoU of the foreground with the requested shape's template, weighted by how much better it fits
  than the other shapes' templates (each drawn at the foreground's centroid and area).
- toy_position: 1 when the foreground centroid is at the requested quadrant's centre, falling linearly to 0 at
  half the image side away from it (any other quadrant's centre is at least that far).

Every score is multiplied by a coverage factor that ramps from 0 with no foreground to 1 at MIN_AREA, so a
blank image scores 0 and a few stray pixels cannot score high. An image with a non-finite pixel scores NaN on
all three: it cannot be judged, and the trainer drops and counts NaNs.

This module does not import `egrpo.rewards.base`: `RewardModel` is a Protocol, so `ToyReward` satisfies it
structurally and the registry can import this module lazily.
"""

from __future__ import annotations

import torch

from egrpo.toyworld.world import (
    BACKGROUND,
    COLOURS,
    SHAPE_AREA,
    SHAPES,
    parse_prompt,
    quadrant_centre,
    shape_masks,
)

# A pixel is foreground when its RGB distance from the background exceeds this: under half the smallest
# background-to-palette distance (0.65, green), so anything drawn in a palette colour counts.
FOREGROUND_THRESHOLD = 0.3
# Foreground is soft for area, colour and centroid: a pixel's weight ramps linearly from 0 to 1 over this RGB
# distance around the threshold. A hard mask would make the rewards piecewise constant in the pixels, so small
# changes of an image (what RL explores) would mostly not change them at all.
FOREGROUND_SOFTNESS = 0.2
# Foreground pixels for full coverage, as a fraction of the image area: half the smallest jittered shape
# (a triangle at 0.85 x size/6 covers about 4% of the image).
MIN_AREA = 0.02
# A foreground pixel's colour match falls linearly from 1 on the segment from the background to the requested
# colour (an anti-aliased edge pixel is a blend of the two) to 0 at this RGB distance from it. It is below the
# smallest distance of a palette colour from another colour's segment (green from yellow's, 0.455), so a pure
# wrong palette colour matches 0.
COLOUR_RADIUS = 0.4
# Softmax temperature over the IoUs with the three shape templates. Equal-area templates of different
# shapes still overlap a lot (circle vs square IoU ~0.83), so differences of a few hundredths must count.
SHAPE_TEMPERATURE = 0.02
# The prompt puts the shape in one quadrant, so a foreground larger than a quadrant is not that shape: the
# shape score shrinks in proportion beyond this fraction of the image (a flat or noise image, whose whole
# frame is foreground and so looks like a perfect square, scores at most 0.25).
MAX_AREA = 0.25


class ToyReward:
    """Scores (B, 3, H, W) images in [0, 1] against toy prompts; see the module docstring."""

    names: tuple[str, ...] = ("toy_colour", "toy_shape", "toy_position")

    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError(f"expected square images of shape (B, 3, H, H), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        scenes = [parse_prompt(p) for p in prompts]
        images = images.detach().to("cpu", torch.float32)
        finite = images.isfinite().flatten(1).all(dim=1)
        images = torch.nan_to_num(images).clamp(0, 1)
        size = images.shape[-1]

        background = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
        distance_from_background = (images - background).norm(dim=1)  # (B, H, W)
        weight = ((distance_from_background - FOREGROUND_THRESHOLD) / FOREGROUND_SOFTNESS + 0.5).clamp(0, 1)
        foreground = weight > 0.5  # the hard mask, for the shape templates' IoU
        area = weight.flatten(1).sum(dim=1)
        count = area.clamp(min=1)  # a divisor that is safe for a blank image (whose sums are all 0)
        coverage = (area / (MIN_AREA * size * size)).clamp(max=1)

        direction = torch.tensor([COLOURS[s.colour] for s in scenes]).view(-1, 3, 1, 1) - background
        offset = images - background
        blend = (
            (offset * direction).sum(dim=1, keepdim=True) / (direction**2).sum(dim=1, keepdim=True)
        ).clamp(0, 1)
        match = (1 - (offset - blend * direction).norm(dim=1) / COLOUR_RADIUS).clamp(min=0)
        colour = (match * blend.squeeze(1) * weight).flatten(1).sum(dim=1) / count

        coords = torch.arange(size, dtype=torch.float32) + 0.5
        cx = (weight.sum(dim=1) * coords).sum(dim=1) / count
        cy = (weight.sum(dim=2) * coords).sum(dim=1) / count
        wanted = torch.tensor([quadrant_centre(s.position, size) for s in scenes])
        distance = torch.hypot(cx - wanted[:, 0], cy - wanted[:, 1])
        position = (1 - distance / (size / 2)).clamp(min=0)

        hard_area = foreground.flatten(1).sum(dim=1).float().clamp(min=1)
        shape = _shape_score(foreground, hard_area, cx, cy, [SHAPES.index(s.shape) for s in scenes])

        nan = torch.tensor(float("nan"))
        return {
            name: torch.where(finite, value * coverage, nan).float()
            for name, value in zip(self.names, (colour, shape, position), strict=True)
        }


def _shape_score(
    foreground: torch.Tensor, area: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, wanted: list[int]
) -> torch.Tensor:
    """Softmax weight of the wanted shape over the IoUs of the mask with each shape's template, times that IoU,
    times the MAX_AREA factor.

    Each template is drawn at the mask's centroid with the mask's area, so only the outline is compared. The
    softmax says whether the mask is more like the wanted shape than like the others; the IoU factor keeps a
    mask that resembles no shape (noise, scattered blobs) low even if the softmax is spread evenly."""
    size = foreground.shape[-1]
    ious = []
    for shape in SHAPES:
        half = (area / SHAPE_AREA[shape]).sqrt()
        template = shape_masks(shape, cx, cy, half, size)
        overlap = (template & foreground).flatten(1).sum(dim=1)
        union = (template | foreground).flatten(1).sum(dim=1)
        ious.append(overlap / union.clamp(min=1))
    iou = torch.stack(ious, dim=1)  # (B, 3)
    weight = torch.softmax(iou / SHAPE_TEMPERATURE, dim=1)
    rows = torch.arange(len(wanted))
    fits = (MAX_AREA * size * size / area).clamp(max=1)
    return weight[rows, wanted] * iou[rows, wanted] * fits
