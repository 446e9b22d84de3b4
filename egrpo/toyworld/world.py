"""The toy world: prompts like "a red circle at the top left" and the images they describe.

Every prompt names one of 4 colours, 3 shapes and 4 quadrants (48 scenes). Images are a single flat-coloured,
anti-aliased shape on a dark grey background, drawn with coordinate masks in pure torch so a whole batch
renders in milliseconds. The same mask code (`shape_masks`) draws the reward templates (`toyworld.rewards`).

Coordinates are in pixels with x to the right and y down; pixel (row i, column j) has its centre at
(x, y) = (j + 0.5, i + 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Palette colours are at least 0.70 apart in RGB (red-yellow is the closest pair) and at least 0.65 from the
# background (green), so the rewards can tell them apart with simple distance thresholds.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
# Dark grey rather than white: every palette colour, yellow included, stands out from it clearly.
BACKGROUND: tuple[float, float, float] = (0.10, 0.10, 0.10)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")

# Area of each shape with half-size h is SHAPE_AREA[shape] * h**2. The rewards invert this to size a
# template from a mask's pixel count.
SHAPE_AREA: dict[str, float] = {"circle": math.pi, "square": 4.0, "triangle": 2.0}

# Half-size of a shape as a fraction of the image side: about a third of the quadrant, so it fits clearly.
HALF_SIZE = 1 / 6
# Pretraining variety: centre jitter of up to +-JITTER_SHIFT * size pixels (2 px at 32) on each axis and a
# size factor in [1 - JITTER_SCALE, 1 + JITTER_SCALE].
JITTER_SHIFT = 1 / 16
JITTER_SCALE = 0.15
# Anti-aliasing samples per pixel along each axis.
SUPERSAMPLE = 4

WORDS: list[str] = ["a", *COLOURS, *SHAPES, "at", "the", "top", "bottom", "left", "right"]


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} at the {self.position}"


def all_scenes() -> list[Scene]:
    """The 48 scenes, colour-major, then shape, then position."""
    return [Scene(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]


_SCENE_BY_PROMPT = {scene.prompt: scene for scene in all_scenes()}


def parse_prompt(text: str) -> Scene:
    """The scene a toy prompt describes; ValueError if `text` is not exactly one of the 48 toy prompts."""
    try:
        return _SCENE_BY_PROMPT[text]
    except KeyError:
        raise ValueError(
            f"not a toy prompt: {text!r} (expected 'a <colour> <shape> at the <position>' with colour in "
            f"{list(COLOURS)}, shape in {list(SHAPES)}, position in {list(POSITIONS)})"
        ) from None


def _held_out(scene: Scene) -> bool:
    """A Latin-square split: hold out the 12 scenes whose colour, shape and position indices sum to 0 mod 4.

    For a fixed (colour, shape) exactly one position is held out, for a fixed (shape, position) exactly one
    colour, and for a fixed (colour, position) at most one shape, so every pair of attributes in an eval
    prompt has been seen together in training: evaluation tests composition, not unseen words or pairs."""
    index = list(COLOURS).index(scene.colour) + SHAPES.index(scene.shape) + POSITIONS.index(scene.position)
    return index % 4 == 0


def train_prompts() -> list[str]:
    """The 36 training prompts (fixed, in `all_scenes` order)."""
    return [s.prompt for s in all_scenes() if not _held_out(s)]


def eval_prompts() -> list[str]:
    """The 12 held-out prompts (fixed, in `all_scenes` order)."""
    return [s.prompt for s in all_scenes() if _held_out(s)]


def quadrant_centre(position: str, size: int) -> tuple[float, float]:
    """(x, y) pixel coordinates of the centre of a quadrant."""
    vertical, horizontal = position.split()
    x = size * (0.25 if horizontal == "left" else 0.75)
    y = size * (0.25 if vertical == "top" else 0.75)
    return x, y


def shape_masks(
    shape: str, cx: torch.Tensor, cy: torch.Tensor, half: torch.Tensor, size: int
) -> torch.Tensor:
    """Boolean (B, size, size) masks of one shape with centres (cx, cy) and half-sizes `half`, each (B,).

    The centre is the shape's centroid: for the triangle (apex up, base 2h wide, height 2h) that puts the
    apex 4h/3 above it and the base 2h/3 below, so a render's pixel centroid is where it was placed."""
    coords = torch.arange(size, dtype=torch.float32, device=cx.device) + 0.5
    dx = coords.view(1, 1, size) - cx.view(-1, 1, 1)
    dy = coords.view(1, size, 1) - cy.view(-1, 1, 1)
    h = half.view(-1, 1, 1)
    if shape == "circle":
        return dx**2 + dy**2 <= h**2
    if shape == "square":
        return (dx.abs() <= h) & (dy.abs() <= h)
    if shape == "triangle":
        below_apex = dy + 4 * h / 3
        return (dy <= 2 * h / 3) & (dx.abs() <= below_apex / 2)
    raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")


def _coverage(shape: str, cx: torch.Tensor, cy: torch.Tensor, half: torch.Tensor, size: int) -> torch.Tensor:
    """(size, size) fraction of each pixel the shape covers, from SUPERSAMPLE x SUPERSAMPLE samples per pixel.

    Anti-aliasing keeps small circles round: with hard pixel masks a single pixel can stick out of a circle,
    which makes it look as much like a square as like a circle to the shape reward."""
    k = SUPERSAMPLE
    fine = shape_masks(shape, cx.view(1) * k, cy.view(1) * k, half.view(1) * k, size * k).float()
    return torch.nn.functional.avg_pool2d(fine, k)[0]


def render_batch(
    scenes: Sequence[Scene],
    size: int = 32,
    generator: torch.Generator | None = None,
    pull_to_centre: float = 0.0,
    dim: float = 0.0,
) -> torch.Tensor:
    """(B, 3, size, size) float32 images in [0, 1]; with a generator, each shape's centre and size are jittered,
    its centre is moved a uniform random fraction in [0, pull_to_centre] of the way to the image centre, and its
    colour is blended towards the background by a uniform random fraction in [0, dim]."""
    n = len(scenes)
    centres = torch.tensor([quadrant_centre(s.position, size) for s in scenes]).view(n, 2)
    half = torch.full((n,), HALF_SIZE * size)
    if generator is not None and pull_to_centre > 0:
        pull = torch.rand(n, 1, generator=generator) * pull_to_centre
        centres = centres + pull * (size / 2 - centres)
    if generator is not None:
        u = torch.rand(n, 3, generator=generator) * 2 - 1  # uniform in [-1, 1]
        centres = centres + u[:, :2] * JITTER_SHIFT * size
        half = half * (1 + u[:, 2] * JITTER_SCALE)
        # Keep every shape whole inside the image (the triangle's apex reaches 4h/3 above its centroid), so
        # a render's mask, area and centroid are exactly what the rewards expect.
        above = torch.tensor([4 / 3 if s.shape == "triangle" else 1.0 for s in scenes]) * half
        centres[:, 0] = torch.minimum(torch.maximum(centres[:, 0], half), size - half)
        centres[:, 1] = torch.minimum(torch.maximum(centres[:, 1], above), size - half)
    coverage = torch.stack(
        [
            _coverage(scene.shape, centres[i, 0], centres[i, 1], half[i], size)
            for i, scene in enumerate(scenes)
        ]
    ).unsqueeze(1)
    background = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    colours = torch.tensor([COLOURS[s.colour] for s in scenes]).view(n, 3, 1, 1)
    intensity = torch.ones(n, 1, 1, 1)
    if generator is not None and dim > 0:
        intensity = 1 - torch.rand(n, 1, 1, 1, generator=generator) * dim
    return background + coverage * intensity * (colours - background)


def render(scene: Scene, size: int = 32, *, jitter: torch.Generator | None = None) -> torch.Tensor:
    """One (3, size, size) image of `scene`, jittered when a generator is given."""
    return render_batch([scene], size, jitter)[0]
