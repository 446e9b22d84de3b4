"""Decoding after a rollout: its own bounded batch (sampler.decode_batch_size), VAE tiling, and images that
travel as uint8 and score exactly as their float equivalents."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import torch

from egrpo.batch import Batch
from egrpo.config import from_dict
from egrpo.images import to_float_images, to_uint8_images
from egrpo.models.families.flux import FluxPolicy, build_flux_pipeline
from egrpo.models.policy import FlowPolicy
from egrpo.models.tiny import save_pipeline
from egrpo.rewards.base import build_reward_models, score_all, score_samples
from egrpo.rewards.tiny import save_tiny_clip
from egrpo.sampling.plans import ode_plan
from egrpo.sampling.rollout import SamplerSettings, decode_images, run_plan
from egrpo.toyworld.world import all_scenes, render_batch
from egrpo.trainer import CUDA_DECODE_BATCH_SIZE, load_policy, resolve_decode_batch_size, sampler_settings

PROMPTS = ["a red circle", "a blue square", "a red square", "a blue circle", "a red circle"]
SEEDS = [0, 1, 2, 3, 4]


def vae_policy(size: int = 32) -> FlowPolicy:
    """A tiny FLUX pipeline with a real AutoencoderKL (2x downsampling)."""
    return FluxPolicy(build_flux_pipeline(), height=size, width=size, max_sequence_length=16)


def record_batch_sizes(policy: FlowPolicy) -> dict[str, list[int]]:
    """Wrap the policy's velocity and decode to record the rows of every call."""
    sizes: dict[str, list[int]] = {"velocity": [], "decode": []}
    velocity, decode = policy.velocity, policy.decode

    def recording_velocity(x, sigma, cond):
        sizes["velocity"].append(len(x))
        return velocity(x, sigma, cond)

    def recording_decode(latents):
        sizes["decode"].append(len(latents))
        return decode(latents)

    policy.velocity, policy.decode = recording_velocity, recording_decode
    return sizes


def rollout_settings(batch_size: int, decode_batch_size: int, steps: int = 4) -> SamplerSettings:
    """The SamplerSettings `sampler_settings` resolves from a config with these sampler fields, on the CPU."""
    sampler = {"steps": steps, "batch_size": batch_size, "decode_batch_size": decode_batch_size}
    cfg = from_dict({"sampler": sampler, "run": {"device": "cpu"}})
    return sampler_settings(cfg)


def test_decode_batches_are_bounded_and_give_the_images_of_one_decode():
    policy = vae_policy()
    sizes = record_batch_sizes(policy)
    plans = ode_plan(PROMPTS, SEEDS, 4)
    chunked = run_plan(policy, plans, rollout_settings(batch_size=3, decode_batch_size=2))
    assert sizes["decode"] == [2, 2, 1]
    assert sizes["velocity"] == [3, 2] * 4  # the transformer batch is sampler.batch_size, at each step
    sizes["decode"].clear()
    whole = run_plan(policy, plans, rollout_settings(batch_size=3, decode_batch_size=len(plans)))
    assert sizes["decode"] == [len(plans)]
    assert torch.equal(chunked.samples["images"], whole.samples["images"])


def test_rollout_images_are_uint8_on_the_cpu_and_marked_finite():
    policy = vae_policy()
    result = run_plan(policy, ode_plan(PROMPTS, SEEDS, 4), rollout_settings(batch_size=8, decode_batch_size=2))
    images = result.samples["images"]
    assert images.dtype == torch.uint8 and images.shape == (len(PROMPTS), 3, 32, 32)
    assert images.device.type == "cpu"
    assert result.samples["image_finite"].tolist() == [True] * len(PROMPTS)
    assert images.float().std() > 0


def test_vae_tiling_decodes_close_to_whole_images():
    """64 px images (32x32 latents) in 48 px tiles (24x24 latents): four overlapping tiles. The tiny VAE is
    random, so its tiles' GroupNorm statistics and mid-block attention differ more from the whole image's
    than a trained VAE's would (measured: mean |difference| 0.024, max 0.24)."""
    plans = ode_plan(PROMPTS[:2], SEEDS[:2], 4)
    untiled = run_plan(vae_policy(64), plans, rollout_settings(batch_size=2, decode_batch_size=2))
    policy = vae_policy(64)
    policy.enable_vae_tiling()
    policy.pipe.vae.tile_sample_min_size, policy.pipe.vae.tile_latent_min_size = 48, 24
    tiled = run_plan(policy, plans, rollout_settings(batch_size=2, decode_batch_size=2))
    difference = (to_float_images(tiled.samples["images"]) - to_float_images(untiled.samples["images"])).abs()
    assert not torch.equal(tiled.samples["images"], untiled.samples["images"])  # tiling did run
    assert difference.mean() < 0.05 and difference.max() < 0.4


def test_load_policy_turns_on_tiling_and_leaves_pixel_latents_alone(tmp_path: Path):
    save_pipeline(build_flux_pipeline(), tmp_path / "flux", height=32, width=32)
    tiling = {"sampler": {"vae_tiling": True}, "run": {"device": "cpu"}}
    assert load_policy(from_dict({**tiling, "model": {"path": str(tmp_path / "flux")}})).pipe.vae.use_tiling
    assert not load_policy(from_dict({"model": {"path": str(tmp_path / "flux")}})).pipe.vae.use_tiling

    toy = load_policy(from_dict(tiling))  # the toy model: pixel latents, no VAE
    latents = toy.initial_noise([0, 1])
    with torch.no_grad():
        assert torch.equal(toy.decode(latents), load_policy(from_dict({})).decode(latents))


def test_decode_batch_size_defaults_to_4_on_cuda_and_to_the_transformer_batch_elsewhere():
    assert resolve_decode_batch_size(0, 32, torch.device("cuda")) == CUDA_DECODE_BATCH_SIZE == 4
    assert resolve_decode_batch_size(0, 32, torch.device("cuda", 1)) == 4
    assert resolve_decode_batch_size(0, 32, torch.device("cpu")) == 32
    assert resolve_decode_batch_size(6, 32, torch.device("cuda")) == 6
    assert resolve_decode_batch_size(6, 32, torch.device("cpu")) == 6
    cfg = from_dict({"sampler": {"batch_size": 12}})
    assert sampler_settings(cfg, torch.device("cuda")).decode_batch_size == 4
    resolved = sampler_settings(cfg, torch.device("cpu"))
    assert resolved.batch_size == 12 and resolved.decode_batch_size == 12


def test_uint8_round_trip_is_within_half_a_level():
    uniform = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    x = torch.cat([torch.linspace(0, 1, 100_001), uniform])
    quantised = to_uint8_images(x)
    assert quantised.dtype == torch.uint8
    assert torch.equal(quantised, (x * 255).round().to(torch.uint8))
    assert (to_float_images(quantised) - x).abs().max() <= 0.5 / 255 + 1e-7
    assert to_uint8_images(torch.tensor([-0.5, 1.5, float("nan"), float("inf")])).tolist() == [0, 255, 0, 255]


def test_rewards_of_uint8_images_equal_the_rewards_of_the_same_images_as_float(tmp_path: Path):
    save_tiny_clip(tmp_path / "clip")
    models = build_reward_models(["toy_colour", "toy_shape", "toy_position", "clip_score"],
                                 {"clip": str(tmp_path / "clip")})
    scenes = all_scenes()[:4]
    prompts = [s.prompt for s in scenes]
    images = to_uint8_images(render_batch(scenes, 32))
    from_uint8 = score_all(models, images, prompts)
    from_float = score_all(models, images.float() / 255, prompts)
    assert set(from_uint8) == {"toy_colour", "toy_shape", "toy_position", "clip_score"}
    for name, value in from_uint8.items():
        assert torch.equal(value, from_float[name]), name
        assert value.isfinite().all(), name


def test_a_non_finite_decode_is_masked_and_scores_nan():
    toy = load_policy(from_dict({}))
    latents = toy.initial_noise([0, 1, 2])
    latents[1, 0, 0] = float("nan")
    with torch.no_grad():
        images, finite = decode_images(toy, latents, batch_size=2)
    assert images.dtype == torch.uint8 and finite.tolist() == [True, False, True]
    prompts = [s.prompt for s in all_scenes()[:3]]
    samples = Batch({"images": images, "image_finite": finite}, {"prompt": prompts})
    rewards = score_samples(build_reward_models(["toy_colour"]), samples)["toy_colour"]
    assert rewards.isnan().tolist() == [False, True, False]
