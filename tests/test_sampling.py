"""Sampling math (ALGORITHMS.md sections 1 and 3) against closed forms and torch.distributions."""

import math

import pytest
import torch

from egrpo.config import from_dict
from egrpo.methods import build_plan, describe_schedule
from egrpo.sampling.plans import merge_lengths, mix_window_start
from egrpo.sampling.rollout import SamplerSettings, run_plan
from egrpo.sampling.steps import (
    NoiseSpec,
    gaussian_logprob,
    ode_step,
    sde_logprob,
    sde_mean,
    shift_time,
    sigma_schedule,
    step_entropy,
    step_std,
)


class LinearFlow:
    """An exact rectified flow towards a per-prompt target x0: v(x, sigma) = (x - x0) / sigma.

    Euler steps along it are exact, which makes it a closed-form stand-in for a trained transformer."""

    latent_shape = (6,)
    device = torch.device("cpu")

    def __init__(self):
        self.encoded = []

    def target(self, prompt: str) -> torch.Tensor:
        return torch.full(self.latent_shape, float(len(prompt)) / 10)

    def encode_prompts(self, prompts):
        self.encoded.extend(prompts)
        return {"x0": torch.stack([self.target(p) for p in prompts])}

    def initial_noise(self, seeds):
        return torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def velocity(self, x, sigma, cond):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - cond["x0"]) / sigma

    def decode(self, latents):
        return latents[:, :3, None, None].clamp(0, 1)


def test_schedule_endpoints_and_shift():
    sigmas = sigma_schedule(8, 3.0)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and len(sigmas) == 9
    assert torch.all(sigmas[1:] < sigmas[:-1])
    t = torch.tensor(0.5, dtype=torch.float64)
    assert float(shift_time(t, 3.0)) == pytest.approx(0.75)
    assert torch.allclose(sigma_schedule(8, 1.0), 1 - torch.arange(9, dtype=torch.float64) / 8)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_logprob_matches_torch_normal(reduction):
    gen = torch.Generator().manual_seed(0)
    mean, x = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 5, generator=gen)
    std = 0.37
    ref = torch.distributions.Normal(mean, std).log_prob(x).flatten(1)
    ref = ref.mean(1) if reduction == "mean" else ref.sum(1)
    assert torch.allclose(gaussian_logprob(x, mean, std, reduction), ref, atol=1e-5)
    per_sample_std = torch.tensor([0.1, 0.5, 2.0])
    ref = torch.distributions.Normal(mean, per_sample_std[:, None, None]).log_prob(x).flatten(1)
    ref = ref.mean(1) if reduction == "mean" else ref.sum(1)
    assert torch.allclose(gaussian_logprob(x, mean, per_sample_std, reduction), ref, atol=1e-4)
    # sum over elements is the mean times the element count
    if reduction == "sum":
        assert torch.allclose(gaussian_logprob(x, mean, std, "sum"), 20 * gaussian_logprob(x, mean, std, "mean"))


def test_ode_integrates_linear_flow_exactly():
    flow = LinearFlow()
    sigmas = sigma_schedule(7, 3.0)
    x0 = flow.target("a red circle")
    x = flow.initial_noise([3])
    eps = x.clone()
    cond = flow.encode_prompts(["a red circle"])
    for i in range(7):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x = ode_step(x, flow.velocity(x, s, cond), s, s_next)
        assert torch.allclose(x, (1 - s_next) * x0 + s_next * eps, atol=1e-5)  # stays on the straight path
    assert torch.allclose(x, x0[None], atol=1e-5)


def test_sde_with_vanishing_noise_is_the_ode_step():
    x, v = torch.randn(2, 8), torch.randn(2, 8)
    ode = ode_step(x, v, 0.8, 0.6)
    assert torch.equal(sde_mean(x, v, 0.8, 0.6, 0.0), ode)
    assert torch.allclose(sde_mean(x, v, 0.8, 0.6, 1e-4), ode, atol=1e-6)
    assert not torch.allclose(sde_mean(x, v, 0.8, 0.6, 0.7), ode, atol=1e-3)


def test_noise_forms_and_merged_step_std():
    sigmas = sigma_schedule(16, 3.0)
    flow = NoiseSpec("flow_grpo", 0.7)
    s1 = float(sigmas[1])
    assert flow.g(sigmas, 0) == pytest.approx(0.7 * math.sqrt(1 / (1 - s1)))  # only the denominator takes sigma_1
    s3 = float(sigmas[3])
    assert flow.g(sigmas, 3) == pytest.approx(0.7 * math.sqrt(s3 / (1 - s3)))
    assert NoiseSpec("dance", 0.3).g(sigmas, 5) == 0.3
    # Flow-GRPO's first step: std exactly a, exp(h) = 0.7 sqrt(2 pi e) = 2.8929 (by hand; 2.861 with the old
    # rule that put sigma_1 in the numerator too)
    assert step_std(flow, sigmas, 0, 1) == pytest.approx(0.7, rel=1e-12)
    assert math.exp(step_entropy(flow, sigmas, 0, 1)) == pytest.approx(2.8929, abs=5e-5)
    # a step merged over l covers sigma_n .. sigma_{n+l}, with g from the start point
    for n, length in [(2, 1), (2, 3), (5, 4)]:
        span = float(sigmas[n] - sigmas[n + length])
        assert step_std(flow, sigmas, n, length) == pytest.approx(flow.g(sigmas, n) * math.sqrt(span))
        h = 0.5 * math.log(2 * math.pi * math.e * flow.g(sigmas, n) ** 2 * span)
        assert step_entropy(flow, sigmas, n, length) == pytest.approx(h)


@pytest.mark.parametrize("form,level,tau", [("flow_grpo", 0.7, 2.2), ("dance", 0.3, 1.2), ("flow_grpo", 0.7, 4.0)])
def test_merge_lengths_reach_tau_minimally(form, level, tau):
    sigmas = sigma_schedule(16, 3.0)
    noise = NoiseSpec(form, level)
    lengths = merge_lengths(sigmas, noise, tau, 8)
    assert len(lengths) == 8
    for n, length in enumerate(lengths):
        capped = n + length == 16
        assert capped or math.exp(step_entropy(noise, sigmas, n, length)) >= tau
        if length > 1:
            assert math.exp(step_entropy(noise, sigmas, n, length - 1)) < tau
    assert len(set(lengths)) > 1 or lengths[0] > 1 or tau < 2.5  # not a constant by accident


def test_describe_schedule_is_computed_from_config():
    cfg = from_dict({"sampler": {"steps": 16}, "egrpo": {"tau": 2.2}})
    info = describe_schedule(cfg)
    assert info["active_steps"] == list(range(8))
    assert len(info["sigmas"]) == 17 and len(info["step_entropy"]) == 16 and len(info["merge_lengths"]) == 8
    higher = describe_schedule(from_dict({"sampler": {"steps": 16}, "egrpo": {"tau": 3.0}}))
    assert all(b >= a for a, b in zip(info["merge_lengths"], higher["merge_lengths"], strict=True))
    assert higher["merge_lengths"] != info["merge_lengths"]


PROMPTS = ["a red circle at the top left", "a blue square at the bottom right"]


def test_egrpo_plan_structure():
    cfg = from_dict({"sampler": {"steps": 8}, "plan": {"method": "egrpo", "group_size": 3}})
    plans = build_plan(cfg, PROMPTS, iteration=0)
    lengths = describe_schedule(cfg)["merge_lengths"]
    assert len(plans) == 2 * 4 * 3
    groups = {}
    for p in plans:
        groups.setdefault(p.group, []).append(p)
    assert len(groups) == 8 and all(len(g) == 3 for g in groups.values())
    for members in groups.values():
        assert len({(m.prompt, m.seed, m.branch_from) for m in members}) == 1  # shared anchor point
        assert len({m.noise_seeds for m in members}) == 3  # distinct exploration noise
        p = members[0]
        assert p.explore_steps == (p.branch_from,) and p.merge_lengths == (lengths[p.branch_from],)
        assert [s.train for s in p.steps] == [True] + [False] * (len(p.steps) - 1)
        assert p.steps[-1].start + p.steps[-1].length == 8
    assert build_plan(cfg, PROMPTS, 0) == plans and build_plan(cfg, PROMPTS, 1) != plans


def test_grpo_and_mix_plans():
    cfg = from_dict({"sampler": {"steps": 10}, "plan": {"method": "grpo", "group_size": 4}})
    plans = build_plan(cfg, PROMPTS, 0)
    assert len(plans) == 8 and all(p.branch_from == 0 and len(p.explore_steps) == 10 for p in plans)
    assert all(sum(s.train for s in p.steps) == 6 for p in plans)
    assert len({p.seed for p in plans if p.group == 0}) == 1  # one shared initial noise per prompt
    mix = from_dict({"sampler": {"steps": 10}, "plan": {"method": "mix"}, "mix": {"window": 4, "move_every": 2}})
    starts = [mix_window_start(0, 4, 2, 10, it) for it in range(16)]
    assert starts[:8] == [0, 0, 1, 1, 2, 2, 3, 3] and max(starts) == 6 and starts[14] == 0
    p = build_plan(mix, PROMPTS, 5)[0]
    assert p.branch_from == 2 and p.explore_steps == (2, 3, 4, 5)
    assert all(s.train == s.sde for s in p.steps)


def _settings(cfg, batch_size=32):
    return SamplerSettings(sigma_schedule(cfg.sampler.steps, cfg.sampler.shift),
                           NoiseSpec(cfg.sampler.noise, cfg.sampler.noise_level), batch_size=batch_size)


@pytest.mark.parametrize("method", ["egrpo", "grpo", "mix"])
def test_rollout_is_independent_of_batching_and_records_logprobs(method):
    cfg = from_dict({"sampler": {"steps": 8}, "plan": {"method": method, "group_size": 3}, "mix": {"window": 3}})
    plans = build_plan(cfg, PROMPTS, 0)
    big = run_plan(LinearFlow(), plans, _settings(cfg, 64))
    small = run_plan(LinearFlow(), plans, _settings(cfg, 1))
    assert torch.equal(big.samples["images"], small.samples["images"])
    assert torch.allclose(big.train_steps["x_out"], small.train_steps["x_out"])
    trained = sum(s.train for p in plans for s in p.steps)
    steps = big.train_steps
    assert len(steps) == trained
    # the stored old log-prob is the transition's log-prob under the same velocity
    flow = LinearFlow()
    v = flow.velocity(steps["x_in"], steps["sigma"], flow.encode_prompts(steps["prompt"]))
    logp = sde_logprob(steps["x_in"], v, steps["x_out"], steps["sigma"], steps["sigma_next"], steps["g"])
    assert torch.allclose(logp, steps["logp_old"], atol=1e-4)
    assert torch.all(steps["g"] > 0)


def test_egrpo_branches_share_the_anchor_and_differ_after_exploring():
    cfg = from_dict({"sampler": {"steps": 8}, "plan": {"method": "egrpo", "group_size": 4}})
    plans = build_plan(cfg, PROMPTS[:1], 0)
    result = run_plan(LinearFlow(), plans, _settings(cfg))
    steps = result.train_steps
    for group in set(result.samples["group"]):
        rows = [i for i, s in enumerate(steps["sample"]) if plans[s].group == group]
        x_in = steps["x_in"][rows]
        assert torch.equal(x_in, x_in[:1].expand_as(x_in))  # same anchor latent
        assert not torch.allclose(steps["x_out"][rows[0]], steps["x_out"][rows[1]])  # different noise
    # the anchor is an ODE trajectory: with a linear flow, at sigma it is (1 - sigma) x0 + sigma eps
    flow = LinearFlow()
    eps = flow.initial_noise([plans[0].seed])[0]
    x0 = flow.target(PROMPTS[0])
    for row in range(len(steps)):
        sigma = float(steps["sigma"][row])
        assert torch.allclose(steps["x_in"][row], (1 - sigma) * x0 + sigma * eps, atol=1e-5)
