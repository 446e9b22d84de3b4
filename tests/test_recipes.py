"""The recipes in launch/configs: every one validates, and the FLUX / SD3.5 recipes hold the methods and
hyperparameters their comments claim (the papers' settings, ALGORITHMS.md section 3)."""

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from egrpo.config import Config, ConfigError, load_config
from egrpo.rewards.base import reward_model_for

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch" / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))

FLUX = {"model.path": "/data/models/FLUX.1-dev", "model.finetune": "full", "model.gradient_checkpointing": True,
        "model.height": 720, "model.width": 720, "model.guidance": 3.5, "sampler.shift": 3.0, "plan.group_size": 12,
        "train.lr": 1e-5, "train.weight_decay": 1e-4, "train.clip_range": 1e-4, "train.adv_clip": 5.0,
        "train.iterations": 300, "data.prompts": "/data/prompts/HPDv2/train.json"}
# What each real-model recipe claims, key by key (dotted config paths).
CLAIMS = {
    "flux-dancegrpo.yaml": {**FLUX, "plan.method": "grpo", "sampler.steps": 16, "sampler.noise": "dance",
                            "sampler.noise_level": 0.3, "grpo.train_fraction": 0.6, "rewards.weights": {"hpsv2": 1.0}},
    "flux-mixgrpo.yaml": {**FLUX, "plan.method": "mix", "sampler.steps": 25, "sampler.noise": "flow_grpo",
                          "sampler.noise_level": 0.7, "mix.window": 4, "mix.start": 0, "mix.move_every": 25,
                          "rewards.weights": {"hpsv2": 1.0, "pickscore": 1.0, "imagereward": 1.0}},
    "flux-egrpo.yaml": {**FLUX, "plan.method": "egrpo", "sampler.steps": 16, "sampler.noise": "flow_grpo",
                        "sampler.noise_level": 0.7, "egrpo.active_steps": 8, "egrpo.tau": 2.2,
                        "rewards.weights": {"hpsv2": 1.0}},
    "flux-aegpo.yaml": {**FLUX, "plan.method": "aegpo", "sampler.steps": 16, "aegpo.budget": "median_split",
                        "aegpo.g_high": 16, "aegpo.g_low": 8, "aegpo.peaks": 4, "aegpo.peak_steps": 8,
                        "aegpo.merge": True, "egrpo.tau": 2.2, "rewards.weights": {"hpsv2": 1.0}},
    "sd35-egrpo.yaml": {"model.path": "/data/models/stable-diffusion-3.5-medium", "model.finetune": "lora",
                        "model.lora_rank": 32, "model.lora_alpha": 64.0, "model.height": 512, "model.width": 512,
                        "model.cfg_scale": 4.5,
                        "plan.method": "egrpo", "sampler.steps": 10, "sampler.noise": "flow_grpo",
                        "sampler.noise_level": 0.7, "egrpo.active_steps": 5, "egrpo.tau": 2.2, "train.lr": 3e-4,
                        "train.kl_beta": 0.01, "rewards.weights": {"pickscore": 1.0}},
    # flow_grpo's pickscore_qwenimage (and verl-omni's Qwen-Image LoRA script)
    "qwen-image-egrpo.yaml": {"model.path": "/data/models/Qwen-Image", "model.finetune": "lora",
                              "model.lora_rank": 64, "model.lora_alpha": 128.0, "model.lora_targets": ("qwen-image",),
                              "model.height": 512, "model.width": 512, "model.cfg_scale": 4.0,
                              "sampler.schedule": "pipeline", "plan.method": "egrpo", "sampler.steps": 10,
                              "sampler.noise": "flow_grpo", "sampler.noise_level": 1.2, "plan.group_size": 16,
                              "egrpo.active_steps": 5, "train.lr": 3e-4, "train.weight_decay": 1e-4,
                              "train.clip_range": 1e-4, "train.kl_beta": 0.0, "rewards.weights": {"pickscore": 1.0}},
    # AEGPO over the flow_grpo Qwen-Image setting
    "qwen-image-aegpo.yaml": {"model.path": "/data/models/Qwen-Image", "model.finetune": "lora",
                              "model.lora_rank": 64, "model.lora_alpha": 128.0, "model.lora_targets": ("qwen-image",),
                              "model.cfg_scale": 4.0, "sampler.steps": 10, "sampler.noise_level": 1.2,
                              "plan.method": "aegpo", "aegpo.budget": "median_split", "aegpo.g_high": 16,
                              "aegpo.g_low": 8, "aegpo.peaks": 4, "aegpo.peak_steps": 5, "aegpo.rollout": "tree",
                              "train.lr": 3e-4, "train.kl_beta": 0.0, "rewards.weights": {"pickscore": 1.0}},
    # Flow-Factory's examples/grpo/lora/flux2_klein/default.yaml
    "flux2-klein-egrpo.yaml": {"model.path": "/data/models/FLUX.2-klein-4B", "model.finetune": "lora",
                               "model.lora_rank": 64, "model.lora_alpha": 128.0, "model.lora_targets": ("flux2",),
                               "model.height": 384, "model.width": 384, "model.cfg_scale": 1.0,
                               "sampler.schedule": "pipeline", "plan.method": "egrpo", "sampler.steps": 4,
                               "sampler.noise": "flow_grpo", "sampler.noise_level": 0.5, "plan.group_size": 16,
                               "egrpo.active_steps": 2, "train.lr": 3e-4, "train.clip_range": 1e-4,
                               "train.kl_beta": 0.0, "rewards.weights": {"pickscore": 1.0}},
    # Flow-Factory's examples/grpo/lora/z_image_turbo/default.yaml
    "z-image-egrpo.yaml": {"model.path": "/data/models/Z-Image-Turbo", "model.finetune": "lora",
                           "model.lora_rank": 64, "model.lora_alpha": 128.0, "model.lora_targets": ("z-image",),
                           "model.height": 512, "model.width": 512, "model.cfg_scale": 1.0,
                           "sampler.schedule": "pipeline", "plan.method": "egrpo", "sampler.steps": 6,
                           "sampler.noise": "flow_grpo", "sampler.noise_level": 0.7, "plan.group_size": 16,
                           "egrpo.active_steps": 3, "train.lr": 3e-4, "train.clip_range": 1e-4,
                           "train.kl_beta": 0.0, "rewards.weights": {"pickscore": 1.0}},
}
# The papers' seconds per iteration on 32 GPUs (ALGORITHMS.md section 4), quoted in the recipes' comments.
REPORTED_TIMES = {"flux-dancegrpo.yaml": "291 s per iteration", "flux-mixgrpo.yaml": "149 s per iteration"}


def value(cfg: Config, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def header(path: Path) -> str:
    """The recipe's leading comment block, without the '#' marks."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return " ".join(lines)


def test_every_real_model_recipe_has_claims():
    assert {p.name for p in RECIPES if not p.name.startswith("toy-")} == set(CLAIMS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.run.name == path.stem


def test_an_unknown_key_fails_validation(tmp_path):
    recipe = yaml.safe_load((CONFIGS / "flux-egrpo.yaml").read_text())
    recipe["sampler"]["stepz"] = 16
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="sampler.stepz"):
        load_config(bad)


@pytest.mark.parametrize("name", CLAIMS)
def test_recipe_has_the_claimed_hyperparameters(name):
    cfg = load_config(CONFIGS / name)
    for key, expected in CLAIMS[name].items():
        assert value(cfg, key) == expected, key


@pytest.mark.parametrize("name", CLAIMS)
def test_real_model_recipe_runs_bf16_from_local_paths_and_states_its_gpus(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.dtype == "bfloat16" and cfg.runtime.bf16 and cfg.runtime.backend == "ray"
    local = [cfg.model.path, cfg.data.prompts, cfg.data.eval_prompts, *cfg.rewards.paths.values()]
    assert all(Path(p).is_absolute() for p in local)
    assert {reward_model_for(r) for r in cfg.rewards.weights} <= set(cfg.rewards.paths)
    r = cfg.runtime
    gpus = r.rollout_workers * r.rollout_gpus + r.reward_servers * r.reward_gpus + r.learners * r.learner_gpus
    text = header(CONFIGS / name)
    assert f"GPUs: {gpus:g} " in text
    assert "Time per iteration:" in text and "not measured" in text
    assert REPORTED_TIMES.get(name, "") in text
    assert cfg.plan.prompts_per_iteration % r.rollout_workers == 0  # whole prompts per rollout worker


@pytest.mark.parametrize("name", [n for n, claims in CLAIMS.items() if claims["plan.method"] != "aegpo"])
def test_plan_json_runs_without_loading_models(name, tmp_path):
    """`egrpo plan --json` on the recipe, with model.path pointing nowhere: it needs no model or data."""
    recipe = load_config(CONFIGS / name)  # the pipeline's schedule is read from the shipped configs by name
    absent = tmp_path / (Path(recipe.model.path).name if recipe.sampler.schedule == "pipeline" else "absent")
    cmd = [sys.executable, "-m", "egrpo.cli", "plan", str(CONFIGS / name), "--json", "--set", f"model.path={absent}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    cfg = load_config(CONFIGS / name)
    assert len(info["sigmas"]) == cfg.sampler.steps + 1
    assert len(info["step_entropy"]) == cfg.sampler.steps
    assert len(info["merge_lengths"]) == cfg.egrpo_active_steps
    if cfg.plan.method == "egrpo":  # the recipe's comment shows the computed merge lengths
        claimed = re.search(r"merge lengths: ([\d, ]+\d)", header(CONFIGS / name)).group(1)
        assert [int(x) for x in claimed.split(", ")] == info["merge_lengths"]
