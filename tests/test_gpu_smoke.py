"""One training iteration of a FLUX.1-dev-sized transformer on a CUDA GPU, through egrpo's real code.

Skipped without CUDA. The transformer has FLUX.1-dev's shape (19 double and 38 single blocks, 24 heads of 128,
guidance embedding, 11.9B parameters) with random bf16 weights built directly on the GPU. Its text inputs take
the width of the tiny CLIP and T5 of `egrpo.models.tiny` instead of FLUX.1-dev's 4096 (T5-XXL) and 768 (CLIP-L),
which changes 0.1% of the parameters. It is saved into a tiny FLUX pipeline folder, which `Trainer` loads with
`FlowPolicy.from_pretrained` like any FLUX.1-dev folder, and trains for one E-GRPO iteration with LoRA in the
in-process loop against the toy rewards. 128x128 images through the tiny VAE (2x) are 1024 image tokens, as
FLUX.1-dev's 512x512, with 512 T5 tokens per prompt. Needs about 50 GB of GPU memory and 25 GB of disk.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

from egrpo.config import from_dict
from egrpo.models.families.flux import build_flux_pipeline
from egrpo.models.tiny import save_pipeline
from egrpo.trainer import Trainer

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: trains a FLUX.1-dev-sized transformer for one iteration"
)

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TEXT_DIM = 32  # the tiny text encoders' width: the transformer's joint_attention_dim and pooled_projection_dim


def write_flux_sized_pipeline(folder: Path) -> None:
    """The tiny FLUX pipeline with its transformer replaced by a FLUX.1-dev-sized one, saved to `folder`."""
    pipe = build_flux_pipeline(text_dim=TEXT_DIM, guidance_embeds=True)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU: 24 GB, never 48 GB of fp32
    try:
        with torch.device("cuda"):
            transformer = FluxTransformer2DModel(
                **FLUX_DEV, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM
            )
    finally:
        torch.set_default_dtype(default_dtype)
    pipe.register_modules(transformer=transformer)
    save_pipeline(pipe, folder, height=128, width=128, max_sequence_length=512)


def test_one_training_iteration_of_a_flux_sized_transformer(tmp_path):
    write_flux_sized_pipeline(tmp_path / "flux-sized")
    torch.cuda.empty_cache()  # the builder's copy is gone; Trainer loads the folder afresh
    cfg = from_dict({
        "run": {"name": "gpu-smoke", "dir": str(tmp_path / "runs"), "device": "cuda", "wandb": "disabled"},
        "model": {"path": str(tmp_path / "flux-sized"), "dtype": "bfloat16", "finetune": "lora"},
        "sampler": {"steps": 4},
        "plan": {"method": "egrpo", "group_size": 2, "prompts_per_iteration": 1},
        "train": {"iterations": 1, "batch_size": 2, "eval_every": 0, "eval_prompts": 1, "eval_seeds": 1},
        "rewards": {"weights": {"toy_colour": 1.0, "toy_position": 1.0}},
        "runtime": {"backend": "local"},
    })
    outputs = Trainer(cfg).run()
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    record = json.loads(outputs.metrics.read_text().splitlines()[-1])
    assert record["iteration"] == 1
    assert record["samples"] == record["train/steps"] == 4  # 2 active steps x 2 branches, one trained step each
    assert record["train/updates"] == 2
    assert record["train/first_ratio_max_dev"] == 0.0  # old log-probs replayed exactly (ALGORITHMS.md section 2)
    assert math.isfinite(record["train/loss"]) and math.isfinite(record["train/grad_norm"])
    assert (outputs.checkpoint / "weights" / "pytorch_lora_weights.safetensors").is_file()
