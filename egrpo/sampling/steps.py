"""Flow-matching sampling as a stochastic policy: schedule, ODE/SDE steps, log-probs, step entropy.

Everything here follows ALGORITHMS.md section 1. Rectified flow: x_t = (1 - t) x0 + t eps, and the model's
velocity v ~ eps - x0. Tensors are any shape with the batch first; per-sample reductions are over the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

NoiseForm = Literal["flow_grpo", "dance"]


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """FLUX/SD3 time shift: shift(t) = s t / (1 + (s - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def sigma_schedule(steps: int, shift: float) -> torch.Tensor:
    """sigma_i = shift(1 - i / T) for i = 0..T (float64, length T + 1): sigma_0 = 1 is noise, sigma_T = 0."""
    t = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return shift_time(t, shift)


@dataclass(frozen=True)
class NoiseSpec:
    """Noise level of the SDE: `flow_grpo` g = a sqrt(sigma / (1 - sigma)), `dance` g = eta (constant)."""

    form: NoiseForm
    level: float

    def g(self, sigmas: torch.Tensor, i: int) -> float:
        """g at the start point sigma_i of a step. At sigma = 1 the flow_grpo formula's denominator is zero, so
        only the denominator takes sigma_1: g_0 = a sqrt(1 / (1 - sigma_1)), and the first step's std
        g_0 sqrt(1 - sigma_1) is exactly a, as in Flow-GRPO's, MixGRPO's and VisualGRPO's code
        (`sqrt(sigma / (1 - where(sigma == 1, sigma_max, sigma)))`; ALGORITHMS.md section 1)."""
        if self.form == "dance":
            return float(self.level)
        sigma = float(sigmas[i])
        denominator = 1 - (float(sigmas[1]) if sigma >= 1.0 else sigma)
        return self.level * math.sqrt(sigma / denominator)


def step_std(noise: NoiseSpec, sigmas: torch.Tensor, start: int, length: int) -> float:
    """Std of an SDE step from sigma_start over `length` steps: g_start * sqrt(|sigma_{start+l} - sigma_start|)."""
    return float(sde_std(noise.g(sigmas, start), float(sigmas[start]), float(sigmas[start + length])))


def step_entropy(noise: NoiseSpec, sigmas: torch.Tensor, start: int, length: int) -> float:
    """Differential entropy per element of the Gaussian transition (ALGORITHMS.md section 3, egrpo):
    h = 0.5 log(2 pi e g_i^2 |sigma_{i+l} - sigma_i|). It depends on the schedule alone."""
    std = step_std(noise, sigmas, start, length)
    return 0.5 * math.log(2 * math.pi * math.e * std**2)


Scalar = float | torch.Tensor  # a float, or a (B,) tensor with one value per sample


def per_sample(value: Scalar, like: torch.Tensor) -> Scalar:
    """Reshape a (B,) tensor so it broadcasts against `like` (B, ...); floats pass through."""
    if isinstance(value, torch.Tensor):
        return value.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))
    return value


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: Scalar) -> torch.Tensor:
    """x0_hat = x - sigma v."""
    return x - per_sample(sigma, x) * v


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma: Scalar, sigma_next: Scalar) -> torch.Tensor:
    """Euler step of the probability-flow ODE: x' = x + (sigma' - sigma) v."""
    return x + (per_sample(sigma_next, x) - per_sample(sigma, x)) * v


def sde_std(g: Scalar, sigma: Scalar, sigma_next: Scalar) -> Scalar:
    """Std of an SDE transition from sigma to sigma' (ALGORITHMS.md section 1): g sqrt(|sigma' - sigma|). The
    one place this is written: rollout, loss and step entropy all call it. Floats or matching (B,) tensors."""
    delta = sigma_next - sigma
    return g * (delta.abs().sqrt() if isinstance(delta, torch.Tensor) else math.sqrt(abs(delta)))


def sde_mean(x: torch.Tensor, v: torch.Tensor, sigma: Scalar, sigma_next: Scalar, g: Scalar) -> torch.Tensor:
    """Mean of the SDE transition: mu = x + delta (v + g^2 / (2 sigma) eps_hat), eps_hat = x + (1 - sigma) v.

    For a merged step, v, g and eps_hat are all taken at the start point sigma. With g = 0 it is the ODE step."""
    sigma, sigma_next, g = (per_sample(a, x) for a in (sigma, sigma_next, g))
    eps_hat = x + (1 - sigma) * v
    return x + (sigma_next - sigma) * (v + g**2 / (2 * sigma) * eps_hat)


def gaussian_logprob(
    x_next: torch.Tensor, mean: torch.Tensor, std: Scalar, reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """log N(x_next; mean, std^2) per element, reduced per sample over all non-batch dims (float32).

    `mean` reduction is what every peer uses, and why the PPO clip range is tiny (ALGORITHMS.md section 1)."""
    std = per_sample(std, x_next)
    log_std = torch.log(std) if isinstance(std, torch.Tensor) else math.log(std)
    diff = (x_next.float() - mean.float()) / std
    per_element = -0.5 * diff**2 - log_std - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, per_element.ndim))
    return per_element.mean(dims) if reduction == "mean" else per_element.sum(dims)


def sde_logprob(
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    g: Scalar,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """log p(x_next | x) of one (possibly merged) SDE step under velocity v; std = g sqrt(|sigma' - sigma|): the
    transition's log-prob from its parts. The rollout and the learner hold the mean and std already and call
    `gaussian_logprob` on them; tests check their stored log-probs against this."""
    return gaussian_logprob(x_next, sde_mean(x, v, sigma, sigma_next, g), sde_std(g, sigma, sigma_next), reduction)
