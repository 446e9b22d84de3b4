"""Execute a rollout plan with a policy: the shared ODE anchors, then every sample's ODE/SDE steps.

All samples advance together: at each schedule index, the samples that start a step there share one batched
transformer call, and each applies its own step (ODE, or an SDE step merged over its own length). Noise is
drawn per sample from its own seed, so results do not depend on how samples are batched or split over workers.
For trained steps it keeps exactly what the learner needs: input latent, output latent, sigma, sigma', g and
the old log-prob (ALGORITHMS.md sections 1 and 3).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from egrpo.batch import Batch
from egrpo.images import to_uint8_images
from egrpo.sampling.plans import SamplePlan
from egrpo.sampling.steps import (
    NoiseSpec,
    gaussian_logprob,
    ode_step,
    per_sample,
    sde_mean,
    sde_std,
    x0_from_velocity,
)


class VelocityModel(Protocol):
    """What sampling needs from a policy (egrpo.models.policy.FlowPolicy implements it)."""

    latent_shape: tuple[int, ...]
    device: torch.device

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]: ...
    def initial_noise(self, seeds: list[int]) -> torch.Tensor: ...
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplerSettings:
    sigmas: torch.Tensor  # float64, length T + 1
    noise: NoiseSpec
    reduction: Literal["mean", "sum"] = "mean"
    decode_from: Literal["final", "x0_hat"] = "final"
    batch_size: int = 32  # samples per transformer call
    decode_batch_size: int = 4  # latents per decode call (FLUX's VAE: ~1.35 GiB per 720x720 image in bf16)


@dataclass
class RolloutResult:
    samples: Batch  # per sample: images (uint8), image_finite; meta: prompt, group, plan index
    # per distinct trained transition: x_in, x_out, sigma, sigma_next, g, logp_old; meta: prompt, sample (the
    # first of its leaves), leaves (the samples it leads to), input (its input state's id), depth (where it ends)
    train_steps: Batch
    transformer_calls: int  # transformer forwards of distinct states (NFE), for benchmarks


class EntropyProbe(Protocol):
    """What the anchor pass needs from an attention-entropy probe (egrpo.entropy implements it)."""

    def take(self) -> torch.Tensor: ...


@torch.no_grad()
def batched_velocity(
    policy: VelocityModel, x: torch.Tensor, sigma: torch.Tensor, prompts: list[str], batch_size: int,
    probe: EntropyProbe | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """v for rows of x, in chunks of `batch_size` (each row has its own sigma and prompt); with a probe
    installed on the policy's transformer, also each row's attention entropy of that call."""
    out, entropy = [], []
    for a in range(0, len(x), batch_size):
        cond = policy.encode_prompts(prompts[a : a + batch_size])
        out.append(policy.velocity(x[a : a + batch_size], sigma[a : a + batch_size], cond))
        if probe is not None:  # the last rows: with classifier-free guidance the call ran [uncond, cond]
            entropy.append(probe.take()[-len(out[-1]):])
    return torch.cat(out), (torch.cat(entropy) if probe is not None else None)


Anchors = dict[tuple[str, int], torch.Tensor]  # (prompt, seed) -> its ODE trajectory's latents (indices 0..n)


def anchor_latents(
    policy: VelocityModel, keys: list[tuple[str, int]], until: list[int], settings: SamplerSettings,
    probe: EntropyProbe | None = None,
) -> tuple[Anchors, int, torch.Tensor | None]:
    """Deterministic ODE trajectories from each (prompt, seed)'s initial noise, kept at indices 0..until;
    with a probe, also E(t): the attention entropy of each key's call at step t, (keys, max(until)), NaN
    past a key's `until`.

    Samples branch off these latents; computing them once per prompt is what makes branching cheap."""
    if not keys:
        return {}, 0, None if probe is None else torch.zeros(0, 0)
    x = policy.initial_noise([seed for _, seed in keys])
    prompts = [prompt for prompt, _ in keys]
    trajectory = {key: [x[k].clone()] for k, key in enumerate(keys)}
    entropy = torch.full((len(keys), max(until, default=0)), float("nan")) if probe is not None else None
    calls = 0
    for i in range(max(until, default=0)):
        rows = [k for k, last in enumerate(until) if i < last]
        sigma = torch.full((len(rows),), float(settings.sigmas[i]))
        v, step_entropy = batched_velocity(policy, x[rows], sigma, [prompts[k] for k in rows],
                                           settings.batch_size, probe)
        if entropy is not None:
            entropy[rows, i] = step_entropy.float().cpu()
        calls += len(rows)
        x[rows] = ode_step(x[rows], v, settings.sigmas[i].item(), settings.sigmas[i + 1].item())
        for k in rows:
            trajectory[keys[k]].append(x[k].clone())
    return {key: torch.stack(latents) for key, latents in trajectory.items()}, calls, entropy


@torch.no_grad()
def run_plan(
    policy: VelocityModel, plans: list[SamplePlan], settings: SamplerSettings, anchors: Anchors | None = None
) -> RolloutResult:
    """Run the plans. `anchors` may hold trajectories computed before under the same weights (AEGPO's probe
    pass is one): those long enough are used instead of being recomputed.

    Samples in the same state (the same anchor latent and the same steps taken so far: a tree's leaves below
    one node, a group's branches before their first SDE step) share one transformer call, and samples that
    also take the same step (the same seed) share its result. A trained step is recorded once per distinct
    transition, with the samples it leads to (`leaves`) and the id of its input state (`input`)."""
    sigmas, total = settings.sigmas, len(settings.sigmas) - 1
    keys = sorted({(p.prompt, p.seed) for p in plans})
    until = {key: max(p.branch_from for p in plans if (p.prompt, p.seed) == key) for key in keys}
    known = {key: a for key, a in (anchors or {}).items() if key in until and len(a) > until[key]}
    missing = [key for key in keys if key not in known]
    computed, calls, _ = anchor_latents(policy, missing, [until[key] for key in missing], settings)
    trajectories = {**known, **computed}

    x = torch.stack([trajectories[(p.prompt, p.seed)][p.branch_from].to(policy.device) for p in plans])
    position = [p.branch_from for p in plans]  # schedule index each sample is at
    next_step = [0] * len(plans)  # index into plan.steps
    prompts = [p.prompt for p in plans]
    states: dict[tuple, int] = {}  # a state's identity (where it came from) -> its id
    state = [states.setdefault((p.prompt, p.seed, p.branch_from), len(states)) for p in plans]
    x0_last = x.clone()
    recorded: list[dict] = []

    while True:
        pending = [k for k in range(len(plans)) if position[k] < total]
        if not pending:
            break
        i = min(position[k] for k in pending)
        rows = [k for k in pending if position[k] == i]
        steps = [plans[k].steps[next_step[k]] for k in rows]
        if any(s.start != i for s in steps):
            raise ValueError(f"plan steps are not contiguous at schedule index {i}")
        first_row: dict[int, int] = {}  # each distinct input state -> its first row; in row order
        for k in rows:
            first_row.setdefault(state[k], k)
        input_of = {s: n for n, s in enumerate(first_row)}
        sigma = float(sigmas[i])
        x_inputs = x[list(first_row.values())]
        v, _ = batched_velocity(policy, x_inputs, torch.full((len(first_row),), sigma),
                                [prompts[k] for k in first_row.values()], settings.batch_size)
        calls += len(first_row)
        edge_rows: dict[tuple, list[int]] = {}  # each distinct (input, step) -> the rows taking it
        for k, s in zip(rows, steps, strict=True):
            edge_rows.setdefault((state[k], s), []).append(k)
        edges = list(edge_rows)
        x_in, v_in = x[[first_row[s] for s, _ in edges]], v[[input_of[s] for s, _ in edges]]
        sigma_next = torch.tensor([float(sigmas[i + step.length]) for _, step in edges])
        g = torch.tensor([settings.noise.g(sigmas, i) if step.sde else 0.0 for _, step in edges])
        xi = torch.stack([torch.randn(policy.latent_shape, generator=torch.Generator().manual_seed(step.noise_seed))
                          if step.sde else torch.zeros(policy.latent_shape) for _, step in edges])
        mean = sde_mean(x_in, v_in, sigma, sigma_next, g)  # g = 0 (ODE rows) gives the Euler step exactly
        std = sde_std(g, sigma, sigma_next)
        x_out = mean + per_sample(std, x_in) * xi.to(x_in)

        trained = [e for e, (_, step) in enumerate(edges) if step.train]
        if trained:
            logp = gaussian_logprob(x_out[trained], mean[trained], std[trained], settings.reduction)
            for n, e in enumerate(trained):
                leaves = edge_rows[edges[e]]
                recorded.append({"sample": leaves[0], "leaves": leaves, "input": edges[e][0], "x_in": x_in[e],
                                 "x_out": x_out[e], "sigma": sigma, "sigma_next": float(sigma_next[e]),
                                 "g": float(g[e]), "logp_old": logp[n], "depth": i + edges[e][1].length})
        if settings.decode_from == "x0_hat":
            x0 = x0_from_velocity(x_inputs, v, sigma)
            for k in rows:
                x0_last[k] = x0[input_of[state[k]]]
        for e, (input_state, step) in enumerate(edges):
            for k in edge_rows[input_state, step]:
                x[k] = x_out[e]
                state[k] = states.setdefault((input_state, step), len(states))
                position[k] = i + step.length
                next_step[k] += 1

    final = x0_last if settings.decode_from == "x0_hat" else x
    images, finite = decode_images(policy, final, settings.decode_batch_size)
    samples = Batch(
        {"images": images, "image_finite": finite},
        {"prompt": prompts, "group": [p.group for p in plans], "plan": list(range(len(plans)))},
    )
    return RolloutResult(samples, _train_steps_batch(recorded, prompts), calls)


def decode_images(
    policy: VelocityModel, latents: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode `latents` in chunks of at most `batch_size` (the decoder's activations, not the transformer's,
    bound this batch): uint8 (B, 3, H, W) CPU images (egrpo.images) and a (B,) bool CPU mask of the images
    that decoded finite. A NaN latent's uint8 image no longer shows it; the mask does, so its reward can be
    NaN."""
    images, finite = [], []
    for a in range(0, len(latents), batch_size):
        decoded = policy.decode(latents[a : a + batch_size])
        finite.append(decoded.isfinite().flatten(1).all(dim=1).cpu())
        images.append(to_uint8_images(decoded).cpu())
    return torch.cat(images), torch.cat(finite)


def _train_steps_batch(recorded: list[dict], prompts: list[str]) -> Batch:
    """Trained steps ordered by sample (then step): the same order however the plan was split or batched."""
    if not recorded:
        return Batch()
    recorded = sorted(recorded, key=lambda r: r["sample"])  # stable: a sample's steps stay in step order
    return Batch(
        {
            "x_in": torch.stack([r["x_in"] for r in recorded]).cpu(),
            "x_out": torch.stack([r["x_out"] for r in recorded]).cpu(),
            "sigma": torch.tensor([r["sigma"] for r in recorded], dtype=torch.float32),
            "sigma_next": torch.tensor([r["sigma_next"] for r in recorded], dtype=torch.float32),
            "g": torch.tensor([r["g"] for r in recorded], dtype=torch.float32),
            "logp_old": torch.stack([r["logp_old"] for r in recorded]).float().cpu(),
        },
        {key: [r[key] for r in recorded] for key in ("sample", "leaves", "input", "depth")}
        | {"prompt": [prompts[r["sample"]] for r in recorded]},
    )


# ------------------------------------------------------------------------------------- AEGPO's entropy probes


class ProbedModel(VelocityModel, Protocol):
    """A policy whose attention can be probed, and that can switch to its reference (base) policy."""

    @property
    def active_transformer(self) -> torch.nn.Module: ...
    def reference(self) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class ProbeRequest:
    prompt: str
    seed: int  # initial-noise seed of the anchor
    reference: bool  # also measure E_ref (the scheduler has not cached it for this (prompt, seed) yet)


@dataclass
class ProbeResult:
    entropy: torch.Tensor  # (requests, steps probed): E_theta(t) along each anchor
    reference: torch.Tensor  # (requests, steps probed): E_ref(t), NaN rows where not requested
    transformer_calls: int


def probe_entropies(
    policy: ProbedModel, requests: list[ProbeRequest], settings: SamplerSettings, probe_settings, steps: int
) -> tuple[ProbeResult, Anchors]:
    """AEGPO's anchor pass (ALGORITHMS.md section 3): E(t) at the first `steps` steps of each request's ODE
    anchor, under the current policy and, where asked, the reference policy; and the current policy's anchor
    latents (on the CPU), which are the rollout's own anchors: `run_plan(..., anchors=...)` reuses them. Only
    the steps where AEGPO looks for peaks are probed (`aegpo.peak_steps`). `probe_settings` is an
    egrpo.entropy ProbeSettings (blocks, heads, rows, chunk, seed)."""
    from egrpo.entropy.attention import AttentionEntropyProbe

    keys = [(r.prompt, r.seed) for r in requests]
    with AttentionEntropyProbe(policy.active_transformer, probe_settings) as probe:
        anchors, calls, entropy = anchor_latents(policy, keys, [steps] * len(keys), settings, probe)
    reference = torch.full_like(entropy, float("nan"))
    wanted = [k for k, r in enumerate(requests) if r.reference]
    if wanted:
        with policy.reference(), AttentionEntropyProbe(policy.active_transformer, probe_settings) as probe:
            _, reference_calls, measured = anchor_latents(
                policy, [keys[k] for k in wanted], [steps] * len(wanted), settings, probe)
        reference[wanted] = measured
        calls += reference_calls
    return ProbeResult(entropy, reference, calls), {key: a.cpu() for key, a in anchors.items()}
