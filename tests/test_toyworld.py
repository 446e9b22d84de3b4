"""Toy world: prompts, splits, renders, the programmatic rewards, and the reward registry they plug into."""

import math
from dataclasses import replace

import pytest
import torch

from egrpo.rewards.base import REWARD_NAMES, build_reward_models, reward_model_for, score_all
from egrpo.toyworld.rewards import ToyReward
from egrpo.toyworld.world import (
    BACKGROUND,
    COLOURS,
    POSITIONS,
    SHAPES,
    WORDS,
    Scene,
    all_scenes,
    eval_prompts,
    parse_prompt,
    render,
    render_batch,
    train_prompts,
)

SIZE = 32


def jittered(scenes, seed=0):
    return render_batch(scenes, SIZE, torch.Generator().manual_seed(seed))


def scores(scenes, prompts, seed=0):
    return ToyReward().score(jittered(scenes, seed), prompts)


# --- prompts and splits ---


def test_scenes_and_prompts_round_trip():
    scenes = all_scenes()
    assert len(scenes) == 48 == len({s.prompt for s in scenes})
    assert Scene("red", "circle", "top left").prompt == "a red circle at the top left"
    assert all(parse_prompt(s.prompt) == s for s in scenes)


@pytest.mark.parametrize(
    "text", ["a purple circle at the top left", "a red circle", "", "A red circle at the top left"]
)
def test_parse_prompt_rejects_non_toy_text(text):
    with pytest.raises(ValueError, match=repr(text)):
        parse_prompt(text)


def test_words_cover_every_prompt():
    assert len(WORDS) == len(set(WORDS))
    assert {w for s in all_scenes() for w in s.prompt.split()} == set(WORDS)


def test_split_is_fixed_disjoint_and_compositional():
    train, held_out = train_prompts(), eval_prompts()
    assert (len(train), len(held_out)) == (36, 12)
    assert set(train) | set(held_out) == {s.prompt for s in all_scenes()}
    assert not set(train) & set(held_out)
    assert train == train_prompts() and held_out == eval_prompts()
    seen = [parse_prompt(p) for p in train]
    for scene in map(parse_prompt, held_out):  # every attribute pair of an eval prompt occurs in training
        assert any(s.colour == scene.colour and s.shape == scene.shape for s in seen)
        assert any(s.colour == scene.colour and s.position == scene.position for s in seen)
        assert any(s.shape == scene.shape and s.position == scene.position for s in seen)


# --- rendering ---


def test_render_shape_range_and_placement():
    scene = Scene("blue", "square", "bottom right")
    image = render(scene, SIZE)
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert torch.equal(image, render_batch([scene], SIZE)[0])
    assert image[:, 24, 24].tolist() == pytest.approx(COLOURS["blue"])  # quadrant centre
    assert image[:, 8, 8].tolist() == pytest.approx(BACKGROUND)  # another quadrant
    assert image[:, 16, 16].tolist() == pytest.approx(BACKGROUND)  # image centre


def test_jitter_is_seeded_and_varies():
    scene = Scene("red", "triangle", "top left")
    a = render(scene, SIZE, jitter=torch.Generator().manual_seed(3))
    b = render(scene, SIZE, jitter=torch.Generator().manual_seed(3))
    c = render(scene, SIZE, jitter=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- rewards ---


def test_perfect_renders_score_high():
    scenes = all_scenes() * 4
    out = scores(scenes, [s.prompt for s in scenes])
    assert set(out) == set(ToyReward.names)
    for name, value in out.items():
        assert value.shape == (len(scenes),) and value.dtype == torch.float32 and value.device.type == "cpu"
        assert value.min() > 0.8, name  # observed minima: colour 1.00, shape 0.93, position 0.82


def _wrong(attribute, values):
    """Every scene paired with a render whose `attribute` is each other value (the prompt is the scene's)."""
    pairs = [
        (s, replace(s, **{attribute: v})) for s in all_scenes() for v in values if v != getattr(s, attribute)
    ]
    return [drawn for _, drawn in pairs], [wanted.prompt for wanted, _ in pairs]


@pytest.mark.parametrize(
    ("attribute", "values", "reward"),
    [
        ("colour", COLOURS, "toy_colour"),
        ("shape", SHAPES, "toy_shape"),
        ("position", POSITIONS, "toy_position"),
    ],
)
def test_a_wrong_attribute_lowers_only_its_reward(attribute, values, reward):
    drawn, prompts = _wrong(attribute, values)
    out = scores(drawn, prompts)
    assert out[reward].max() < 0.3  # observed maxima: colour 0.15, shape 0.06, position 0.00
    for other in set(ToyReward.names) - {reward}:
        assert out[other].min() > 0.8, other


def test_garbage_images_score_low_and_finite():
    prompts = [s.prompt for s in all_scenes()]
    background = torch.tensor(BACKGROUND).view(1, 3, 1, 1).expand(48, 3, SIZE, SIZE)
    for image in (background, torch.zeros(48, 3, SIZE, SIZE), torch.ones(48, 3, SIZE, SIZE)):
        out = ToyReward().score(image, prompts)
        assert all(v.isfinite().all() and v.max() < 0.3 for v in out.values())
    noise = ToyReward().score(
        torch.rand(48, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), prompts
    )
    assert all(v.isfinite().all() for v in noise.values())
    # Noise's foreground centroid is the image centre, 0.707 of the falloff distance from every quadrant centre.
    assert (
        noise["toy_colour"].max() < 0.3
        and noise["toy_shape"].max() < 0.3
        and noise["toy_position"].max() < 0.35
    )


def test_non_finite_image_scores_nan_alone():
    scenes = all_scenes()[:3]
    images = jittered(scenes)
    images[1, 0, 5, 5] = float("nan")
    out = ToyReward().score(images, [s.prompt for s in scenes])
    for value in out.values():
        assert value.isnan().tolist() == [False, True, False]


def test_score_rejects_bad_inputs():
    images = jittered(all_scenes()[:2])
    with pytest.raises(ValueError, match="prompts"):
        ToyReward().score(images, ["a red circle at the top left"])
    with pytest.raises(ValueError, match="not a toy prompt"):
        ToyReward().score(images, ["a red circle at the top left", "a cat"])
    with pytest.raises(ValueError, match="shape"):
        ToyReward().score(images[:, :, :, :16], ["a red circle at the top left"] * 2)


# --- registry ---


def test_registry_resolves_and_builds_each_model_once():
    assert REWARD_NAMES["toy"] == ToyReward.names
    assert reward_model_for("toy_colour") == "toy"
    with pytest.raises(ValueError, match="toy_shape"):  # the message lists the known names
        reward_model_for("toy_size")
    models = build_reward_models(["toy_shape", "toy_colour"])
    assert len(models) == 1 and isinstance(models[0], ToyReward)


def test_score_all_merges_and_keeps_nan():
    scenes = all_scenes()[:4]
    images = jittered(scenes)
    images[2] = math.nan
    out = score_all(build_reward_models(["toy_position"]), images, [s.prompt for s in scenes])
    assert set(out) == set(ToyReward.names)
    assert all(v.shape == (4,) and v.isnan().tolist() == [False, False, True, False] for v in out.values())


def test_colour_reward_credits_intensity_and_pretraining_renders_can_fade_and_drift():
    from egrpo.toyworld.world import BACKGROUND

    scene = Scene("red", "square", "top left")
    full = render_batch([scene], 32)
    background = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    half = background + 0.5 * (full - background)
    reward = ToyReward()
    full_colour = reward.score(full, [scene.prompt])["toy_colour"].item()
    half_colour = reward.score(half, [scene.prompt])["toy_colour"].item()
    assert full_colour > 0.9 and 0.4 < half_colour / full_colour < 0.6
    gen = torch.Generator().manual_seed(0)
    faded = render_batch([scene] * 64, 32, gen, pull_to_centre=0.5, dim=0.45)
    scores = reward.score(faded, [scene.prompt] * 64)
    assert scores["toy_colour"].mean() < full_colour - 0.1  # dimmer on average
    assert scores["toy_position"].mean() < reward.score(full, [scene.prompt])["toy_position"].item() - 0.05
