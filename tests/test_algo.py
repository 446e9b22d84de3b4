"""Advantages and the clipped GRPO objective (ALGORITHMS.md section 2)."""

import math

import pytest
import torch

from egrpo.algo.advantages import group_advantages
from egrpo.algo.loss import grpo_loss
from egrpo.batch import Batch


def test_group_normalisation_zero_mean_unit_std():
    gen = torch.Generator().manual_seed(0)
    rewards = {"a": torch.rand(12, generator=gen)}
    groups = [0] * 4 + [1] * 4 + [2] * 4
    adv = group_advantages(rewards, groups, {"a": 1.0})
    for g in range(3):
        values = adv.values[4 * g : 4 * g + 4]
        assert abs(values.mean().item()) < 1e-6
        assert values.std(unbiased=False).item() == torch.tensor(1.0).item() or abs(values.std(unbiased=False) - 1) < 1e-5
    assert adv.valid.all() and adv.dropped_nan == 0


def test_equal_rewards_give_zero_and_clipping():
    adv = group_advantages({"a": torch.tensor([0.5, 0.5, 0.5, 0.5])}, [0, 0, 0, 0], {"a": 1.0})
    assert torch.equal(adv.values, torch.zeros(4))
    # one outlier among many: its normalised value is sqrt(n - 1) = 5.57 > 5, so it is clipped
    r = torch.zeros(32)
    r[0] = 1.0
    adv = group_advantages({"a": r}, [0] * 32, {"a": 1.0}, clip=5.0)
    assert adv.values[0].item() == 5.0
    assert math.isclose(adv.values[1].item(), -1 / math.sqrt(31), rel_tol=1e-5)


def test_multi_reward_per_reward_vs_weighted_sum():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([100.0, 0.0, 100.0, 0.0])
    groups = [0, 0, 0, 0]
    per = group_advantages({"a": a, "b": b}, groups, {"a": 1.0, "b": 0.5})
    za = (a - a.mean()) / a.std(unbiased=False)
    zb = (b - b.mean()) / b.std(unbiased=False)
    assert torch.allclose(per.values, za + 0.5 * zb, atol=1e-5)
    raw = group_advantages({"a": a, "b": b}, groups, {"a": 1.0, "b": 0.5}, combine="weighted_sum")
    s = a + 0.5 * b
    assert torch.allclose(raw.values, (s - s.mean()) / s.std(unbiased=False), atol=1e-5)
    assert not torch.allclose(per.values, raw.values)  # the large-scale reward dominates only the raw sum


def test_nan_rewards_are_dropped_and_counted():
    r = torch.tensor([1.0, float("nan"), 3.0, 5.0, float("nan"), 2.0])
    adv = group_advantages({"a": r}, [0, 0, 0, 1, 1, 1], {"a": 1.0})
    assert adv.dropped_nan == 2
    assert adv.valid.tolist() == [True, False, True, True, False, True]
    assert adv.values[1] == 0 and adv.values[4] == 0 and torch.isfinite(adv.values).all()
    assert torch.allclose(adv.values[[0, 2]], torch.tensor([-1.0, 1.0]))  # normalised over survivors only
    lone = group_advantages({"a": torch.tensor([1.0, float("nan")])}, [0, 0], {"a": 1.0})
    assert not lone.valid.any()


def _loss_inputs(advantage: float, shift: float):
    """A 1-sample minibatch whose new mean is `mean` (a leaf) and old log-prob is taken at mean - shift."""
    x_out = torch.zeros(1, 4)
    mean = torch.full((1, 4), 0.1, requires_grad=True)
    std = torch.tensor([0.5])
    steps = Batch({"x_out": x_out, "advantage": torch.tensor([advantage])})
    from egrpo.sampling.steps import gaussian_logprob

    logp_old = gaussian_logprob(x_out, mean.detach() + shift, std)
    return mean, std, steps, logp_old


def test_ratio_is_one_and_gradient_raises_logprob_for_positive_advantage():
    from egrpo.sampling.steps import gaussian_logprob

    for advantage in (1.0, -1.0):
        mean, std, steps, logp_old = _loss_inputs(advantage, shift=0.0)
        loss, stats = grpo_loss(mean, std, steps, logp_old, clip_range=1e-4)
        assert stats["ratio_mean"] == 1.0 and stats["ratio_max_dev"] == 0.0
        loss.backward()
        with torch.no_grad():  # a small gradient step changes the log-prob in the advantage's direction
            stepped = mean - 1e-3 * mean.grad
            delta = gaussian_logprob(steps["x_out"], stepped, std) - gaussian_logprob(steps["x_out"], mean, std)
        assert delta.item() * advantage > 0


def test_clipping_stops_the_gradient_beyond_the_range():
    # the new policy already raised the log-prob by far more than eps: for A > 0 the clipped term is active
    mean, std, steps, logp_old = _loss_inputs(1.0, shift=0.3)
    loss, stats = grpo_loss(mean, std, steps, logp_old, clip_range=1e-4)
    assert stats["ratio_mean"] > 1 + 1e-4 and stats["clip_fraction"] == 1.0
    loss.backward()
    assert torch.count_nonzero(mean.grad) == 0
    # for A < 0 the unclipped term is larger, so the gradient still pushes the log-prob back down
    mean, std, steps, logp_old = _loss_inputs(-1.0, shift=0.3)
    loss, _ = grpo_loss(mean, std, steps, logp_old, clip_range=1e-4)
    loss.backward()
    assert torch.count_nonzero(mean.grad) > 0


def test_kl_term_is_zero_at_the_reference_and_positive_away():
    mean, std, steps, logp_old = _loss_inputs(1.0, 0.0)
    _, stats = grpo_loss(mean, std, steps, logp_old, 1e-4, mean_ref=mean.detach(), kl_beta=0.1)
    assert stats["kl"] == 0.0
    _, stats = grpo_loss(mean, std, steps, logp_old, 1e-4, mean_ref=mean.detach() + 0.2, kl_beta=0.1)
    assert stats["kl"] > 0


def test_a_group_of_equal_rewards_gets_zero_advantage_despite_float32_rounding():
    """Six rewards of 0.3: their float32 mean is 0.3 + 3e-8, so (r - mean) / (std + 1e-8) gave every member
    +0.7488; such a group carries no signal and now gets 0. A real spread of 1e-5 still counts."""
    equal = torch.full((6,), 0.3)
    assert equal.mean() != equal[0]  # the rounding this guards against
    assert group_advantages({"a": equal}, [0] * 6, {"a": 1.0}).values.abs().max() == 0.0
    spread = torch.tensor([0.3, 0.3, 0.3, 0.30001, 0.3, 0.3])
    assert group_advantages({"a": spread}, [0] * 6, {"a": 1.0}).values.abs().max() > 1.0


def test_sample_std_option_matches_the_peers_torch_std():
    """train.adv_std_ddof=1: (r - mean) / (torch.std(r) + 1e-8), torch.std's default (unbiased), as DanceGRPO
    computes it; checked against float64 arithmetic done here."""
    r = [0.2, 0.9, 0.4, 0.5]
    mean = sum(r) / 4
    std = (sum((x - mean) ** 2 for x in r) / 3) ** 0.5
    expected = torch.tensor([(x - mean) / (std + 1e-8) for x in r], dtype=torch.float64)
    adv = group_advantages({"a": torch.tensor(r)}, [0] * 4, {"a": 1.0}, ddof=1)
    assert torch.allclose(adv.values.double(), expected, atol=1e-6)
    assert torch.allclose(group_advantages({"a": torch.tensor(r)}, [0] * 4, {"a": 1.0}).values.double(),
                          expected * (3 / 4) ** -0.5, atol=1e-6)  # ddof 0: larger by sqrt(G / (G - 1))


def test_kl_forms_ours_and_flow_grpos():
    """kl_form=egrpo divides the squared mean difference by the transition's variance 2 g^2 |delta|;
    flow_grpo by 2 g^2 (Flow-GRPO's code): with g = 0.5 and |delta| = 0.04, 25x smaller."""
    mean, _, steps, logp_old = _loss_inputs(1.0, 0.0)
    g, delta = 0.5, 0.04
    std = torch.tensor([g * delta**0.5])
    steps = Batch({**steps.tensors, "g": torch.tensor([g])})
    ref = mean.detach() + 0.2
    _, ours = grpo_loss(mean, std, steps, logp_old, 1e-4, mean_ref=ref, kl_beta=0.1)
    _, flow = grpo_loss(mean, std, steps, logp_old, 1e-4, mean_ref=ref, kl_beta=0.1, kl_form="flow_grpo")
    assert ours["kl"] == pytest.approx(0.2**2 / (2 * g**2 * delta), rel=1e-5)
    assert flow["kl"] == pytest.approx(0.2**2 / (2 * g**2), rel=1e-5)
