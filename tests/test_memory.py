"""`egrpo plan CONFIG --memory` (egrpo.memory): the estimates against peaks measured on CPU, the plan's shape,
every shipped recipe, and the GPU recipes fitting the GPUs their headers name.

Measured peaks are the bytes of tensor storages alive at once during a pass (`TensorMemoryTracker`), above the
weights, inputs and already-accumulated gradients (the steady state of gradient accumulation). CPU attention is
SDPA's flash kernel, which keeps what the CUDA kernels keep (q, k, v, output, log-sum-exp), so the activation
counts are the GPU's; only the VAE's and the caching allocator's CUDA overheads are not seen here.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from peft import LoraConfig

from egrpo.cli import main
from egrpo.config import load_config
from egrpo.memory import (
    GB,
    inference_working_set,
    lora_saved_fraction,
    measured_pass_peak,
    memory_plan,
    transformer_activations,
    transformer_shape,
)
from egrpo.models.families.flux import build_flux_pipeline
from egrpo.models.families.sd3 import SD3Policy, build_sd3_pipeline
from egrpo.models.tiny import save_pipeline

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch" / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
GPU_RECIPES = [p for p in RECIPES if not p.name.startswith("toy-")]
# estimate / measured, for every pass checked below (the ratios measured are in the report of this change:
# 0.96-1.33 over tiny FLUX and SD3 models and an SD3.5-wide one)
TOLERANCE = (0.8, 1.5)


def transformer_inputs(transformer: torch.nn.Module, rows: int, latent: int, text_tokens: int) -> dict:
    """Random inputs of one call: a `latent` x `latent` latent (FLUX: packed into 2x2 patches) and `text_tokens`
    text states."""
    c = transformer.config
    inputs = {"encoder_hidden_states": torch.randn(rows, text_tokens, c.joint_attention_dim),
              "pooled_projections": torch.randn(rows, c.pooled_projection_dim), "return_dict": False}
    if isinstance(transformer, FluxTransformer2DModel):
        tokens = (latent // 2) ** 2
        inputs.update(hidden_states=torch.randn(rows, tokens, c.in_channels), timestep=torch.rand(rows),
                      img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text_tokens, 3))
        if c.guidance_embeds:
            inputs["guidance"] = torch.full((rows,), 3.5)
    else:
        inputs.update(hidden_states=torch.randn(rows, c.in_channels, latent, latent),
                      timestep=torch.rand(rows) * 1000)
    return inputs


def estimated(transformer, rows: int, image_tokens: int, text_tokens: int, training: bool, checkpointing: bool,
              saved_fraction: float = 1.0) -> float:
    shape = transformer_shape(transformer)
    b = transformer.dtype.itemsize
    if not training:
        return rows * inference_working_set(shape, image_tokens, text_tokens, b)
    full = saved_fraction == 1.0
    activations = transformer_activations(
        shape, image_tokens=image_tokens, text_tokens=text_tokens, rows=rows, dtype_bytes=b,
        checkpointing=checkpointing, saved_fraction=saved_fraction,
        largest_gradient_bytes=shape.largest_parameter * b if full else 0)
    return activations["saved"] + activations["backward"]


def image_tokens_of(transformer, latent: int) -> int:
    patch = 2 if isinstance(transformer, FluxTransformer2DModel) else transformer.config.patch_size
    return (latent // patch) ** 2


PASSES = [  # (rows, training, gradient checkpointing)
    (2, False, False), (1, True, False), (2, True, False), (2, True, True)]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_estimates_match_measured_peaks_of_tiny_models(family):
    """Full fine-tuning of the tiny FLUX (1 double + 1 single block) and SD3 (1 joint block) transformers, fp32:
    a rollout forward and learner forward+backward passes at 1-2 rows, with and without checkpointing."""
    torch.manual_seed(0)
    pipe = build_flux_pipeline(num_layers=2, num_single_layers=2, attention_head_dim=32, guidance_embeds=True) \
        if family == "flux" else build_sd3_pipeline()
    transformer = pipe.transformer.requires_grad_(True)
    latent, text_tokens = 32, 16
    image_tokens = image_tokens_of(transformer, latent)
    for rows, training, checkpointing in PASSES:
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        inputs = transformer_inputs(transformer, rows, latent, text_tokens)
        ratio = estimated(transformer, rows, image_tokens, text_tokens, training, checkpointing) \
            / measured_pass_peak(transformer, inputs, training)
        assert TOLERANCE[0] <= ratio <= TOLERANCE[1], (rows, training, checkpointing, ratio)


def test_estimates_match_measured_peaks_of_an_sd35_wide_model():
    """SD3.5-medium's width (24 heads x 64, T5 states 4096 wide, pooled 2048, RMS-normed q/k, dual attention in
    block 0) at 2 blocks, random weights, fp32, with the sd35 recipe's LoRA (rank 32 on the attention
    projections): a rollout forward of 2 rows and learner passes of 1 row."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    cfg = load_config(CONFIGS / "sd35-egrpo.yaml")
    targets = SD3Policy.lora_modules(cfg.model.lora_targets)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha,
                                       target_modules=targets))
    fraction = lora_saved_fraction(transformer_shape(transformer), "lora", cfg.model.lora_targets)
    latent, text_tokens = 16, 77 + 16
    image_tokens = image_tokens_of(transformer, latent)
    for rows, training, checkpointing in [(2, False, False), (1, True, False), (1, True, True)]:
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        inputs = transformer_inputs(transformer, rows, latent, text_tokens)
        ratio = estimated(transformer, rows, image_tokens, text_tokens, training, checkpointing, fraction) \
            / measured_pass_peak(transformer, inputs, training)
        assert TOLERANCE[0] <= ratio <= TOLERANCE[1], (rows, training, checkpointing, ratio)


def test_flux_vae_decode_estimate_is_the_measured_one():
    """The VAE constant is FLUX's decode measured on CUDA: ~1.35 GiB per 720x720 image in bf16."""
    plan = memory_plan(load_config(CONFIGS / "flux-egrpo.yaml", ["sampler.decode_batch_size=1"]))
    decode = plan.role("rollout").phases["VAE decode"]["VAE decode"]
    assert decode / 2**30 == pytest.approx(1.35, rel=0.02)


# --------------------------------------------------------------------------------------------- the plan itself


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--memory", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_prints_a_memory_plan(path, capsys):
    info = plan_json(capsys, str(path))
    assert set(info) == {"model", "roles", "fits", "gpu_memory_gb"}
    assert info["gpu_memory_gb"] == 80
    assert set(info["roles"]) == set(info["fits"]) == {"rollout", "learner", "reward"}
    assert info["model"]["transformer_params"] > 0
    for role in info["roles"].values():
        assert set(role) == {"peak_gb", "parts"}
        assert sum(role["parts"].values()) == pytest.approx(role["peak_gb"], abs=1e-6)
        assert all(value > 0 for value in role["parts"].values())
    expected = "model.path" if load_config(path).model.path == "toy" else "shipped"
    assert info["model"]["source"] == expected


def test_text_plan_has_a_table_and_a_verdict_per_role(capsys):
    assert main(["plan", str(CONFIGS / "flux-egrpo.yaml"), "--memory", "--gpu-memory", "40"]) == 0
    out = capsys.readouterr().out
    assert "shipped architecture FLUX.1-dev" in out and "11.90B parameters" in out
    for title in ("rollout worker", "learner rank 0", "reward server"):
        assert title in out
    assert len(re.findall(r"^  (fits|DOES NOT FIT): ", out, re.MULTILINE)) == 3
    assert "of 40 GB" in out and "of 10 GB" in out  # reward servers get runtime.reward_gpus of a GPU


def test_shipped_architectures_are_the_published_ones(capsys):
    flux = plan_json(capsys, str(CONFIGS / "flux-egrpo.yaml"))["model"]
    assert flux["transformer_params"] == 11_901_408_320  # FLUX.1-dev: 19 double + 38 single blocks
    assert flux["text_encoder_params"] == {"text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656}
    assert (flux["image_tokens"], flux["text_tokens"]) == (45 * 45, 512)
    sd35 = plan_json(capsys, str(CONFIGS / "sd35-egrpo.yaml"))["model"]
    assert sd35["transformer_params"] == pytest.approx(2.243e9, rel=1e-3)  # + the 0.23B-element position table
    assert set(sd35["text_encoder_params"]) == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    assert (sd35["image_tokens"], sd35["text_tokens"]) == (32 * 32, 77 + 128)
    assert sd35["rewards"]["pickscore"] == {"params": 986_109_441, "source": "shipped"}  # CLIP ViT-H-14


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_source_is_model_path_for_a_tiny_folder(family, tmp_path, capsys):
    pipe = build_flux_pipeline(guidance_embeds=True) if family == "flux" else build_sd3_pipeline()
    save_pipeline(pipe, tmp_path / "tiny", height=64, width=64)
    recipe = str(CONFIGS / "toy-egrpo.yaml")
    model = plan_json(capsys, recipe, "--set", f"model.path={tmp_path / 'tiny'}")["model"]
    assert model["source"] == "model.path" and model["architecture"] == str(tmp_path / "tiny")
    assert model["transformer_params"] == sum(p.numel() for p in pipe.transformer.parameters())
    assert model["vae_params"] == sum(p.numel() for p in pipe.vae.parameters())
    assert model["image_tokens"] == (64 // 2 // 2) ** 2  # the tiny VAE downsamples 2x, then 2x2 patches


def test_a_folder_without_configs_and_no_shipped_architecture_is_a_config_error(tmp_path, capsys):
    assert main(["plan", str(CONFIGS / "flux-egrpo.yaml"), "--memory", "--set", f"model.path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "model.path" in err and "model_index.json" in err and "FLUX.1-dev" in err


@pytest.mark.parametrize("value", ["0", "-8", "lots", "nan"])
def test_a_wrong_gpu_memory_is_a_clear_error(value, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["plan", str(CONFIGS / "flux-egrpo.yaml"), "--memory", "--gpu-memory", value])
    assert stop.value.code == 2
    message = f"--gpu-memory: expected a positive number of GB per GPU, e.g. 80, got '{value}'"
    assert message in capsys.readouterr().err


def test_gpu_memory_without_memory_is_a_config_error(capsys):
    assert main(["plan", str(CONFIGS / "flux-egrpo.yaml"), "--gpu-memory", "40"]) == 2
    assert "add --memory" in capsys.readouterr().err


def test_zero3_learner_memory_falls_with_more_learners():
    peaks = [memory_plan(load_config(CONFIGS / "flux-egrpo.yaml", [f"runtime.learners={k}"])).role("learner")
             for k in (4, 8, 15)]
    totals = [role.total("forward/backward") for role in peaks]
    assert totals[0] > totals[1] > totals[2]
    optimizer = [role.phases["forward/backward"]["Adam moments"] for role in peaks]
    assert optimizer[0] == pytest.approx(optimizer[2] * 15 / 4)


def test_gradient_checkpointing_lowers_activations():
    def saved(checkpointing: bool) -> float:
        cfg = load_config(CONFIGS / "flux-egrpo.yaml", [f"model.gradient_checkpointing={checkpointing}"])
        return memory_plan(cfg).role("learner").phases["forward/backward"]["activations (saved for backward)"]

    assert saved(True) < saved(False) / 10  # FLUX: 57 blocks' inputs and one block, against all 57 blocks


def test_reference_copies_are_where_the_runtime_keeps_them():
    """Full fine-tuning: rollout workers keep the 24 GB reference for aegpo only, learners for KL only."""
    def parts(recipe: str, *overrides: str) -> tuple[dict, dict]:
        plan = memory_plan(load_config(CONFIGS / recipe, list(overrides)))
        return plan.role("rollout").parts, plan.role("learner").phases["forward/backward"]

    rollout, learner = parts("flux-aegpo.yaml")
    assert rollout["reference copy"] / GB == pytest.approx(23.8, abs=0.1) and learner["reference copy"] == 0
    rollout, learner = parts("flux-egrpo.yaml", "train.kl_beta=0.01")
    assert "reference copy" not in rollout and learner["reference copy"] / GB == pytest.approx(23.8, abs=0.1)
    rollout, learner = parts("sd35-egrpo.yaml")  # LoRA: the reference is the adapter switched off
    assert "reference copy" not in rollout and learner["reference copy"] == 0


# ------------------------------------------------------------------------------------------ the GPU recipes


def header_gpu_memory(path: Path) -> float:
    """The GB per GPU a recipe's header names: 'GPUs: 32 (4 nodes x 8 x 80 GB)'."""
    found = re.search(r"^# GPUs: \d+ \(\d+ nodes? x \d+ x (\d+) GB", path.read_text(), re.MULTILINE)
    assert found, f"{path.name}: the header names no GPU memory"
    return float(found.group(1))


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_gpu_recipe_fits_the_gpus_its_header_names(path):
    """By the plan, with 10% headroom on rollout workers and learners, and the numbers in the header are the
    plan's."""
    gpu = header_gpu_memory(path)
    plan = memory_plan(load_config(path), gpu)
    assert all(plan.to_json()["fits"].values())
    for role in ("rollout", "learner"):
        assert plan.role(role).peak <= 0.9 * gpu * GB, role
    header = path.read_text()
    for role in plan.roles:
        assert f"{role.peak / GB:.1f} GB" in header, (role.role, f"{role.peak / GB:.1f}")
