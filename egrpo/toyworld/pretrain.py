"""`egrpo toy pretrain`: build the toy text-to-image model and pretrain it by flow matching.

The model is a real `FluxTransformer2DModel` in a real `FluxPipeline` folder (tiny CLIP + T5 text encoders,
word-level T5 vocabulary) whose latents are pixels: a 32x32 RGB image in [-1, 1], pixel-unshuffled by 2
(12 channels at 16x16; FLUX packs that into 64 tokens of 48). It is trained on renders of all 48 toy scenes
with jittered centre and size, loose placement (each shape is pulled a random 0-`pull_to_centre` of the way from
its quadrant's centre towards the image centre) and faded colours (each shape drawn at a random 1-`dim` to 100%
of its palette intensity): a stand-in for the imprecise, washed-out images real base models learn from. The base
model therefore draws shapes too dim and too close to the middle: smooth, unimodal errors that the
prompt-checking rewards measure and RL can correct.
The loss is the rectified-flow loss ||v_theta(x_t, t) - (eps - x0)||^2 and
t ~ logit-normal(0, 1) (as SD3 trains). Deterministic for a seed on one machine type; the folder it writes is
loaded by the same `FlowPolicy.from_pretrained` that loads FLUX.1-dev.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import torch
from tqdm import tqdm

from egrpo.models.families.flux import build_flux_pipeline
from egrpo.models.policy import FlowPolicy
from egrpo.models.tiny import save_pipeline
from egrpo.toyworld.world import WORDS, all_scenes, render_batch

log = logging.getLogger("egrpo.toy")

IMAGE_SIZE = 32
PIXEL_UNSHUFFLE = 2
TEXT_TOKENS = 12  # toy prompts are 8 T5 tokens; FLUX.1-dev's 512 would make text 90% of the sequence
MODEL = dict(num_layers=2, num_single_layers=2, num_attention_heads=4, attention_head_dim=16, text_dim=32)


def pretrain(out: Path, steps: int = 2000, seed: int = 0, batch_size: int = 48, lr: float = 1e-3,
             pull_to_centre: float = 0.5, dim: float = 0.45) -> FlowPolicy:
    """Write a pretrained toy pipeline folder to `out` and return the policy loaded from it."""
    torch.manual_seed(seed)
    pipe = build_flux_pipeline(**MODEL, vae=False, pixel_unshuffle=PIXEL_UNSHUFFLE, words=WORDS, seed=seed)
    save_pipeline(pipe, out, height=IMAGE_SIZE, width=IMAGE_SIZE, pixel_unshuffle=PIXEL_UNSHUFFLE,
                  max_sequence_length=TEXT_TOKENS)
    policy = FlowPolicy.from_pretrained(out)
    transformer = policy.transformer
    transformer.train().requires_grad_(True)
    params = [p for p in transformer.parameters() if p.requires_grad]
    log.info("toy model: %d transformer parameters; %d training steps of %d images", sum(p.numel() for p in params),
             steps, batch_size)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    scenes = all_scenes()
    picker = random.Random(seed)
    data_gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="toy pretrain", unit="step")
    for _step in bar:
        batch = [picker.choice(scenes) for _ in range(batch_size)]
        x0 = policy.encode_images(render_batch(batch, IMAGE_SIZE, data_gen, pull_to_centre, dim))
        eps = torch.randn(x0.shape, generator=data_gen)
        t = torch.sigmoid(torch.randn(batch_size, generator=data_gen))
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        v = policy.velocity(x_t, t, policy.encode_prompts([s.prompt for s in batch]))
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    transformer.eval().requires_grad_(False)
    transformer.save_pretrained(out / "transformer")
    log.info("saved the pretrained toy model to %s", out)
    return FlowPolicy.from_pretrained(out)
