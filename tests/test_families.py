"""Every model family through the user's path: `egrpo tiny FAMILY DIR` writes a tiny twin, and the toy recipes
train on it, probe it and size it with model.path pointing at that folder; each family's LoRA presets resolve
on its published architecture. What each family computes is checked against its diffusers pipeline in
tests/test_family_<family>.py (FLUX.1 and SD3: tests/test_models.py)."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

from egrpo.checkpoint import load_checkpoint
from egrpo.cli import main
from egrpo.config import load_config
from egrpo.memory import ARCHITECTURES, _build_component, load_architecture
from egrpo.methods import schedule_sigmas
from egrpo.models.families import FAMILIES, policy_class
from egrpo.models.folder import check_pipeline_folder
from egrpo.models.policy import FlowPolicy
from egrpo.sampling.steps import sigma_schedule
from egrpo.trainer import load_policy

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch" / "configs"
# each family's published architectures shipped for the memory plan (egrpo/models/architectures/SOURCES.md)
PUBLISHED = {"flux": ["FLUX.1-dev"], "sd3": ["stable-diffusion-3.5-medium"], "qwen-image": ["Qwen-Image"],
             "flux2": ["FLUX.2-dev", "FLUX.2-klein-4B"], "z-image": ["Z-Image-Turbo"]}
# a short toy run: 2 iterations, a checkpoint and a held-out evaluation at the end, in-process
SHORT_RUN = ["train.iterations=2", "train.checkpoint_every=2", "train.eval_every=2", "train.eval_prompts=2",
             "runtime.backend=local"]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    for family in FAMILIES:
        assert main(["tiny", family, str(root / family)]) == 0
    return {family: root / family for family in FAMILIES}


def sets(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def test_every_family_has_one_entry_in_each_table() -> None:
    assert set(PUBLISHED) == set(FAMILIES)
    for family in FAMILIES:
        assert policy_class(family).family == family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_egrpo_tiny_writes_a_pipeline_that_loads_as_its_family(tiny_folders: dict[str, Path], family: str) -> None:
    folder = tiny_folders[family]
    check_pipeline_folder(folder)  # the CLI's pre-flight check
    policy = FlowPolicy.from_pretrained(folder)
    cls = policy_class(family)
    assert type(policy) is cls
    assert (policy.height, policy.width, policy.max_sequence_length) == tuple(
        cls.tiny_settings[key] for key in ("height", "width", "max_sequence_length"))
    images = policy.decode(policy.initial_noise([0, 1]))
    assert images.shape == (2, 3, policy.height, policy.width) and torch.isfinite(images).all()
    cond = policy.encode_prompts(["a red circle", "a blue square at the top left"])
    velocity = policy.velocity(policy.initial_noise([0, 1]), 0.5, cond)
    assert velocity.shape == (2, *policy.latent_shape) and torch.isfinite(velocity).all()


def test_egrpo_tiny_refuses_a_folder_that_holds_something(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    assert main(["tiny", "z-image", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and keep.read_text() == "mine"
    with pytest.raises(SystemExit):  # argparse: an unknown family names the choices
        main(["tiny", "wan", str(tmp_path / "wan")])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_toy_recipe_trains_on_the_tiny_twin(tiny_folders: dict[str, Path], family: str, tmp_path: Path) -> None:
    """E-GRPO's toy recipe with model.path at the family's tiny folder: 2 iterations, held-out rewards, and a
    checkpoint that loads into a freshly loaded policy and changes its samples."""
    overrides = [f"model.path={tiny_folders[family]}", f"run.dir={tmp_path}", *SHORT_RUN]
    assert main(["train", str(CONFIGS / "toy-egrpo.yaml"), *sets(*overrides)]) == 0
    run = tmp_path / "toy-egrpo"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if "train/policy_loss" in m]
    assert len(trained) == 2 and all(math.isfinite(m["train/policy_loss"]) for m in trained)
    assert sum("eval/reward_mean" in m for m in metrics) == 2  # before training and after it

    cfg = load_config(CONFIGS / "toy-egrpo.yaml", overrides)
    policy = load_policy(cfg)
    before = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
    load_checkpoint(run / "checkpoints", policy)
    after = policy.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the LoRA moved from its no-op start


@pytest.mark.parametrize("family", list(FAMILIES))
def test_egrpo_plan_probes_the_tiny_twins_attention(tiny_folders: dict[str, Path], family: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    png = tmp_path / "entropy.png"
    args = ["plan", str(CONFIGS / "toy-aegpo.yaml"), "--json", "--png", str(png),
            *sets(f"model.path={tiny_folders[family]}")]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    curves = info["attention_entropy"]
    assert len(curves) == load_config(CONFIGS / "toy-aegpo.yaml").plan.prompts_per_iteration
    values = [e for curve in curves.values() for e in curve]
    assert all(0 < e < 1 for e in values) and len(set(values)) > 1
    assert png.is_file()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_memory_plan_reads_the_tiny_folder(tiny_folders: dict[str, Path], family: str,
                                           capsys: pytest.CaptureFixture) -> None:
    args = ["plan", str(CONFIGS / "toy-egrpo.yaml"), "--memory", "--json", *sets(f"model.path={tiny_folders[family]}")]
    assert main(args) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    policy = FlowPolicy.from_pretrained(tiny_folders[family])
    assert model["source"] == "model.path"
    assert model["transformer_params"] == sum(p.numel() for p in policy.transformer.parameters())
    assert model["image_tokens"] == math.prod(policy.latent_shape) // policy.transformer.config.in_channels \
        or family in ("sd3", "z-image")  # these two patchify inside the transformer (tokens != latent pixels)


@pytest.mark.parametrize("family,model", [(f, m) for f, models in PUBLISHED.items() for m in models])
def test_lora_presets_resolve_on_the_published_architecture(family: str, model: str) -> None:
    """Built on the meta device from the shipped config: every module a preset names is a Linear there."""
    folder = ARCHITECTURES / model / "transformer"
    transformer = _build_component(folder, "diffusers", json.loads((folder / "config.json").read_text())["_class_name"])
    linears = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    cls = policy_class(family)
    assert {"attention", family} <= set(cls.lora_presets)
    blocks = {name for name, _ in transformer.named_modules() if name.count(".") == 1}  # e.g. "transformer_blocks.3"
    for target in cls.lora_modules((family,)):
        if target.split(".")[0].endswith("_blocks") and ".".join(target.split(".")[:2]) not in blocks:
            continue  # an entry named by block index (FLUX.2's single blocks) for a deeper model of the family
        assert any(name == target or name.endswith("." + target) for name in linears), (model, target)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_default_schedule_is_the_familys(tiny_folders: dict[str, Path], family: str) -> None:
    """`sampler.schedule: family`: FLUX.1 samples at shift(1 - i/T) as DanceGRPO and its successors do; the other
    families with their pipeline's own scheduler, as flow_grpo and Flow-Factory do; an explicit choice wins."""
    folder = tiny_folders[family]
    cfg = load_config(None, [f"model.path={folder}", "sampler.steps=6"])
    cls = policy_class(family)
    policy = FlowPolicy.from_pretrained(folder)
    if cls.default_schedule == "shift":
        expected = sigma_schedule(6, cfg.sampler.shift)
    else:
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        image_tokens = load_architecture(cfg).image_tokens
        expected = cls.pipeline_sigmas(scheduler_config, 6, image_tokens)
    torch.testing.assert_close(schedule_sigmas(cfg), expected, atol=0, rtol=0)
    explicit = load_config(None, [f"model.path={folder}", "sampler.steps=6", "sampler.schedule=shift"])
    torch.testing.assert_close(schedule_sigmas(explicit), sigma_schedule(6, cfg.sampler.shift), atol=0, rtol=0)
    assert policy.family == family


@pytest.mark.parametrize("family,extra", [("qwen-image", ["model.cfg_scale=2.0"]), ("z-image", [])])
def test_one_iteration_on_ray_equals_the_in_process_loop(tiny_folders: dict[str, Path], family: str,
                                                         extra: list[str], tmp_path: Path, local_ray) -> None:
    """The new families' masked, variable-length prompt states (and Qwen-Image's true CFG with its empty
    prompt) on 2 rollout workers and 2 ZeRO-2 learners that get their embeddings from the rollouts: the
    in-process loop's rollouts, rewards and loss."""
    from egrpo.runtime.driver import RayTrainer
    from egrpo.trainer import Trainer

    common = [f"model.path={tiny_folders[family]}", "train.iterations=1", "plan.prompts_per_iteration=3",
              "plan.group_size=3", "train.eval_every=0", "run.wandb=disabled", "runtime.dashboard=false",
              "runtime.timeout_s=300", *extra]
    recipe = CONFIGS / "toy-egrpo.yaml"
    reference = Trainer(load_config(recipe, [f"run.dir={tmp_path / 'local'}", *common, "runtime.backend=local"]))
    reference.run()
    distributed = RayTrainer(load_config(recipe, [
        f"run.dir={tmp_path / 'ray'}", *common, "runtime.rollout_workers=2", "runtime.learners=2",
        "runtime.zero_stage=2", "model.learner_text_encoders=false"]))
    try:
        metrics = distributed.iteration(0)
    finally:
        distributed.close()
    local = [json.loads(line) for line in (reference.cfg.run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert metrics["samples/received"] == metrics["samples/requested"] == 3 * 4 * 3  # 3 prompts, 4 steps, G 3
    assert metrics["reward/mean"] == pytest.approx(local["reward/mean"], rel=1e-5)
    assert metrics["nfe/rollout"] == local["nfe/rollout"] and metrics["train/steps"] == local["train/steps"]
    assert metrics["train/first_ratio_max_dev"] == 0.0  # the learners' replay is the rollouts' policy exactly
    assert metrics["train/policy_loss"] == pytest.approx(local["train/policy_loss"], rel=1e-4, abs=2e-7)


# parameters of the published checkpoints (their model cards: Qwen-Image 20B + Qwen2.5-VL-7B; FLUX.2 [dev] 32B +
# Mistral-Small-3.1 24B; FLUX.2 [klein] 4B + Qwen3-4B; Z-Image 6B + Qwen3-4B), counted exactly from the shipped configs
PUBLISHED_PARAMS = {"Qwen-Image": (20_430_401_088, 8_292_166_656), "FLUX.2-dev": (32_223_281_152, 24_011_361_280),
                    "FLUX.2-klein-4B": (3_875_544_576, 4_022_468_096), "Z-Image-Turbo": (6_154_908_736, 4_022_468_096)}


@pytest.mark.parametrize("model", list(PUBLISHED_PARAMS))
def test_the_memory_plan_sizes_the_published_models(model: str, capsys: pytest.CaptureFixture) -> None:
    """A model.path that is not there, named like a shipped model, is sized from the shipped configs."""
    args = ["plan", str(CONFIGS / "toy-egrpo.yaml"), "--memory", "--json", *sets(f"model.path=/absent/{model}")]
    assert main(args) == 0
    sized = json.loads(capsys.readouterr().out)["model"]
    assert sized["source"] == "shipped"
    assert (sized["transformer_params"], sum(sized["text_encoder_params"].values())) == PUBLISHED_PARAMS[model]
    assert (sized["height"], sized["width"]) == (1024, 1024)  # the pipelines' default size


def test_a_new_family_on_ray_survives_nan_rewards_uneven_rows_and_a_killed_rollout_worker(
        tiny_folders: dict[str, Path], tmp_path: Path, local_ray) -> None:
    """Real runs are uneven: Qwen-Image (masked text, true CFG) for 2 iterations on 2 rollout workers and 2
    ZeRO-2 learners, the reward servers scoring the first sample of every shard NaN, a batch of 7 that gives
    the ranks 4 and 3 rows, and the rollout worker killed at iteration 1: every sample is accounted for, the
    NaN ones dropped and counted, and the last checkpoint loads."""
    import ray

    from egrpo.runtime.driver import RayTrainer

    cfg = load_config(CONFIGS / "toy-egrpo.yaml", [
        f"model.path={tiny_folders['qwen-image']}", f"run.dir={tmp_path}", "model.cfg_scale=2.0",
        "train.iterations=2", "plan.prompts_per_iteration=2", "plan.group_size=3", "train.batch_size=7",
        "train.eval_every=0", "train.checkpoint_every=1", "run.wandb=disabled", "runtime.dashboard=false",
        "runtime.timeout_s=300", "runtime.rollout_workers=2", "runtime.learners=2", "runtime.zero_stage=2",
        "chaos.kill=rollout", "chaos.at_iteration=1"])
    trainer = RayTrainer(cfg)

    def poison(server):  # runs inside each RewardServer (defined here, so Ray pickles it by value)
        for model in server.models:
            def first_sample_nan(images, prompts, score=model.score):
                rewards = score(images, prompts)
                for values in rewards.values():
                    values[0] = float("nan")
                return rewards

            model.score = first_sample_nan

    ray.get([server.__ray_call__.remote(poison) for server in trainer.reward.actors])
    trainer.run()
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "train/steps" in r]
    assert [r["iteration"] for r in trained] == [1, 2]
    for r in trained:
        assert r["samples/received"] == r["samples/requested"] == 2 * 4 * 3  # 2 prompts, 4 steps, G 3
        assert r["reward/nan_dropped"] == 2  # one per rollout shard
        assert r["train/steps"] == 22 and r["train/first_ratio_max_dev"] == 0.0  # minibatches of 7, 7 and 8
    policy = load_policy(cfg)
    load_checkpoint(cfg.run_dir / "checkpoints", policy)  # the last checkpoint loads
