"""The model families egrpo trains, one file each in this package, and the tables that find them.

A family file defines a `FlowPolicy` subclass (egrpo/models/policy.py says which hooks it fills in): how the
family's pipeline encodes prompts, packs latents, calls its transformer and its VAE, which modules LoRA
adapts, how the attention-entropy probe reads its attention blocks, how its memory is sized, its pipeline's
schedule and its tiny twin. Adding a family is one new file plus one line in each table below.

This module stays free of torch and diffusers: the CLI's pre-flight check reads PIPELINE_FAMILIES.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from egrpo.models.policy import FlowPolicy

# family name (`egrpo tiny FAMILY`, recipes) -> (module in this package, its FlowPolicy subclass)
FAMILIES: dict[str, tuple[str, str]] = {
    "flux": ("flux", "FluxPolicy"),
    "sd3": ("sd3", "SD3Policy"),
    "qwen-image": ("qwen_image", "QwenImagePolicy"),
    "flux2": ("flux2", "Flux2Policy"),
    "z-image": ("z_image", "ZImagePolicy"),
}

# model_index.json's _class_name -> the family that runs it
PIPELINE_FAMILIES: dict[str, str] = {
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
    "QwenImagePipeline": "qwen-image",
    "Flux2Pipeline": "flux2",  # FLUX.2 [dev]
    "Flux2KleinPipeline": "flux2",  # FLUX.2 [klein]
    "ZImagePipeline": "z-image",
}

# the transformer's class name -> its family (the probe and the memory plan see only the transformer)
TRANSFORMER_FAMILIES: dict[str, str] = {
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "QwenImageTransformer2DModel": "qwen-image",
    "Flux2Transformer2DModel": "flux2",
    "ZImageTransformer2DModel": "z-image",
}


def policy_class(family: str) -> type[FlowPolicy]:
    """The FlowPolicy subclass of `family` (a key of FAMILIES)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; egrpo has {', '.join(FAMILIES)}")
    module, name = FAMILIES[family]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def family_of_transformer(transformer: object) -> type[FlowPolicy]:
    """The FlowPolicy subclass whose family's transformer `transformer` is (peft-wrapped or not)."""
    name = type(transformer).__name__
    if name not in TRANSFORMER_FAMILIES:
        raise TypeError(f"egrpo supports the transformers {', '.join(TRANSFORMER_FAMILIES)}, not {name}")
    return policy_class(TRANSFORMER_FAMILIES[name])
