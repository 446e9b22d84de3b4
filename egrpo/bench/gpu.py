"""`egrpo bench system --gpu`: the per-call costs of egrpo's code on a FLUX.1-dev-sized transformer.

The transformer has FLUX.1-dev's shape (19 double-stream and 38 single-stream blocks, 24 heads of 128,
guidance embedding; about 12B parameters) with random weights, built directly on the GPU in bf16, and sees
FLUX's sequence at 1024x1024: 4096 image tokens and 512 T5 tokens. It sits in a real FluxPipeline with tiny
text encoders and pixel latents (egrpo.models.tiny.build_flux_pipeline), so everything measured runs egrpo's
own code: `run_plan` (a grpo rollout), the attention probe on the anchor pass, `GRPOLearner` on LoRA, and the
state dicts that weight sync moves. Where it differs from the real model, the cost does not change: pixel
latents at 256x256 make the 4096 tokens (48 input channels instead of 64), the pooled text projection is
4096 wide instead of 768, and the RoPE axes are (32, 48, 48) instead of (16, 56, 56).

One GPU cannot run a NCCL broadcast (two ranks may not share a device), so weight sync is measured as what it
costs on the GPU's side: device-to-host for the sender's state dict, host-to-device for a receiver's load.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from egrpo.bench.common import median_seconds, table
from egrpo.config import TrainConfig
from egrpo.entropy.attention import AttentionEntropyProbe, ProbeSettings
from egrpo.learner import GRPOLearner, make_minibatches
from egrpo.models.families.flux import FluxPolicy, build_flux_pipeline
from egrpo.models.policy import FlowPolicy
from egrpo.sampling.plans import grpo_plan
from egrpo.sampling.rollout import SamplerSettings, anchor_latents, run_plan
from egrpo.sampling.steps import NoiseSpec, sigma_schedule

LORA_RANK = 32
GiB = 2**30
PIXEL_UNSHUFFLE = 2  # pixel latents: 3 x 2 x 2 channels, then FLUX packs 2x2 of them per token


@dataclass(frozen=True)
class FluxSpec:
    layers: int  # double-stream blocks
    single_layers: int
    heads: int
    head_dim: int
    text_dim: int  # T5 width (joint_attention_dim)
    image_tokens: int  # a square number
    text_tokens: int


FLUX_DEV = FluxSpec(layers=19, single_layers=38, heads=24, head_dim=128, text_dim=4096, image_tokens=4096,
                    text_tokens=512)
TINY = FluxSpec(layers=1, single_layers=1, heads=2, head_dim=16, text_dim=32, image_tokens=64, text_tokens=16)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def flux_policy(spec: FluxSpec, device: torch.device, dtype: torch.dtype) -> FlowPolicy:
    """A FlowPolicy of `spec`'s size with random weights, created on `device` in `dtype` (never in host RAM)."""
    with torch.device(device), _default_dtype(dtype):
        pipe = build_flux_pipeline(num_layers=spec.layers, num_single_layers=spec.single_layers,
                                   num_attention_heads=spec.heads, attention_head_dim=spec.head_dim,
                                   text_dim=spec.text_dim, guidance_embeds=True, vae=False,
                                   pixel_unshuffle=PIXEL_UNSHUFFLE)
    side = 4 * math.isqrt(spec.image_tokens)  # pixel-unshuffle by 2, then FLUX's 2x2 packing
    return FluxPolicy(pipe, height=side, width=side, max_sequence_length=spec.text_tokens,
                      settings={"pixel_unshuffle": PIXEL_UNSHUFFLE})


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _transfer(state: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Seconds and GB/s to copy `state` (on `device`) to host memory and back into place."""
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    host: dict[str, torch.Tensor] = {}

    def to_host() -> None:
        host.update({k: v.to("cpu") for k, v in state.items()})

    def to_device() -> None:
        for k, v in state.items():
            v.copy_(host[k])

    to_host_s = median_seconds(to_host, 1, warmup=0, device=device)
    to_device_s = median_seconds(to_device, 1, warmup=0, device=device)
    return {"bytes": nbytes, "to_host_s": to_host_s, "to_device_s": to_device_s,
            "to_host_gb_per_s": nbytes / to_host_s / 1e9, "to_device_gb_per_s": nbytes / to_device_s / 1e9}


def _weights(policy: FlowPolicy, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The transformer's weights where they live (on the device): all of them, or the trainable ones."""
    return {name: p.detach() for name, p in policy.transformer.named_parameters()
            if p.requires_grad or not trainable_only}


def flux_measurements(spec: FluxSpec, device: torch.device, dtype: torch.dtype, quick: bool) -> dict[str, Any]:
    """Rollout, probe, learn and weight-transfer costs of egrpo's code on a random transformer of `spec`."""
    steps, group, repeats = (4, 1, 1) if quick else (8, 2, 2)  # samples: 2 prompts x group
    policy = flux_policy(spec, device, dtype)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": str(dtype).removeprefix("torch."), "spec": asdict(spec),
        "parameters": sum(p.numel() for p in policy.transformer.parameters()),
    }
    sync = {"full": _transfer(_weights(policy, trainable_only=False), device)}
    policy.setup_finetune("lora", rank=LORA_RANK, alpha=LORA_RANK)
    sampler = SamplerSettings(sigma_schedule(steps, 3.0), NoiseSpec("flow_grpo", 0.7))
    prompts = ["a red circle at the top left", "a blue square at the bottom right"]
    plans = grpo_plan(prompts, [0, 1], group, steps, 0.6, random.Random(0))

    _reset_peak(device)
    rollouts = []
    rollout_s = median_seconds(lambda: rollouts.append(run_plan(policy, plans, sampler)), repeats, device=device)
    rollout = rollouts[-1]
    result["rollout"] = {"samples": len(plans), "steps": steps, "nfe": rollout.transformer_calls,
                         "seconds": rollout_s, "seconds_per_nfe": rollout_s / rollout.transformer_calls,
                         "images_per_s": len(plans) / rollout_s, "peak_memory_gib": _peak_gib(device)}

    keys = [(p, k) for k, p in enumerate(prompts)]
    until = [steps] * len(keys)
    plain_s = median_seconds(lambda: anchor_latents(policy, keys, until, sampler), repeats, device=device)

    def probed() -> None:
        with AttentionEntropyProbe(policy.active_transformer, ProbeSettings()) as probe:
            anchor_latents(policy, keys, until, sampler, probe)

    probed_s = median_seconds(probed, repeats, device=device)
    result["probe"] = {"anchors": len(keys), "steps": steps, "plain_s": plain_s, "probed_s": probed_s,
                       "ratio": probed_s / plain_s}

    train_steps = rollout.train_steps
    train_steps.tensors["advantage"] = torch.randn(len(train_steps), generator=torch.Generator().manual_seed(0))
    learner = GRPOLearner(policy, TrainConfig(batch_size=1, lr=1e-5))  # one trained step per optimiser step
    minibatches = make_minibatches(train_steps, learner.train.batch_size, seed=0)
    _reset_peak(device)
    learn_s = median_seconds(lambda: learner.train_iteration(minibatches), repeats, device=device)
    result["learn"] = {"trained_steps": len(train_steps), "seconds": learn_s,
                       "seconds_per_step": learn_s / len(train_steps), "peak_memory_gib": _peak_gib(device)}

    sync[f"lora r={LORA_RANK}"] = _transfer(_weights(policy, trainable_only=True), device)
    result["weight_sync"] = sync
    return result


def report(result: dict[str, Any]) -> str:
    r, p, lrn = result["rollout"], result["probe"], result["learn"]
    lines = [f"{result['device']}, {result['dtype']}, {result['parameters'] / 1e9:.2f}B parameters, "
             f"{result['spec']['image_tokens']} image + {result['spec']['text_tokens']} text tokens",
             table(["measurement", "value"], [
                 ["rollout s per NFE (batched)", r["seconds_per_nfe"]],
                 ["rollout images/s", r["images_per_s"]],
                 ["rollout peak GiB", r["peak_memory_gib"]],
                 ["probe overhead (anchor pass with / without)", p["ratio"]],
                 ["learn s per trained step (old log-prob + loss + backward)", lrn["seconds_per_step"]],
                 ["learn peak GiB", lrn["peak_memory_gib"]],
             ]),
             table(["state", "GiB", "to host s", "GB/s", "to device s", "GB/s"],
                   [[name, s["bytes"] / GiB, s["to_host_s"], s["to_host_gb_per_s"], s["to_device_s"],
                     s["to_device_gb_per_s"]] for name, s in result["weight_sync"].items()])]
    return "\n".join(lines)
