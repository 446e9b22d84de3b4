"""The sigmas a model's own diffusers pipeline samples with (`sampler.schedule: pipeline`).

egrpo's default schedule is shift(1 - i/T) (egrpo.sampling.steps.sigma_schedule), what DanceGRPO, VisualGRPO,
MixGRPO and BranchGRPO use on FLUX. Flow-GRPO samples SD3 with the pipeline's own scheduler, and FLUX.1-dev's
pipeline shifts its schedule by the image's token count. This reproduces both pipelines' step 5, "Prepare
timesteps" (diffusers 0.42 FluxPipeline / StableDiffusion3Pipeline), from the scheduler's config alone:

- FLUX passes sigmas = linspace(1, 1/T, T) and mu = calculate_shift(image tokens), which the scheduler uses
  when its config has `use_dynamic_shifting` (FLUX.1-dev: yes; then `shift` is unused), else it applies `shift`.
- SD3 passes no sigmas: the scheduler spaces T timesteps from its sigma_max down to its training sigma_min
  (1/1000) and shifts them, so the last non-zero sigma is ~0.003 (shift 3), not shift(1/T); mu only with
  `use_dynamic_shifting`.
The result has T + 1 values, the last 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift


def pipeline_sigmas(scheduler_config: dict[str, Any], family: str, steps: int, image_tokens: int) -> torch.Tensor:
    """float64 sigmas (T + 1) of the `family` ("flux" or "sd3") pipeline's sampling loop at `steps` steps for an
    image of `image_tokens` transformer tokens."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    config = scheduler.config
    dynamic = config.get("use_dynamic_shifting", False)
    max_shift = config.get("max_shift", 1.15 if family == "flux" else 1.16)  # the pipelines' own fallbacks
    mu = calculate_shift(image_tokens, config.get("base_image_seq_len", 256),
                         config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5), max_shift)
    if family == "flux":
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    else:
        scheduler.set_timesteps(steps, **({"mu": mu} if dynamic else {}))
    return scheduler.sigmas.double()
