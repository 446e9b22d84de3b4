"""The in-process reference loop on the toy world: it learns, checkpoints, resumes, and drops NaN rewards."""

import json
import math
from pathlib import Path

import pytest
import torch

from egrpo.checkpoint import load_checkpoint, resolve_checkpoint
from egrpo.config import load_config
from egrpo.methods import build_plan
from egrpo.sampling.rollout import run_plan
from egrpo.trainer import Trainer, load_policy, sampler_settings, score_rollout

RECIPES = Path(__file__).parents[1] / "launch" / "configs"
# Held-out reward (toy_colour + toy_position, each in [0, 1]) must rise by at least this much over the recipe's
# 80 iterations. Runs are deterministic for fixed seeds on one CPU thread; the measured gains (README, "The toy
# world") are about twice these margins.
MIN_GAIN = {"toy-egrpo.yaml": 0.08, "toy-grpo.yaml": 0.025, "toy-aegpo.yaml": 0.09}


def _config(tmp_path, recipe, *overrides):
    return load_config(RECIPES / recipe, [f"run.dir={tmp_path}", "run.wandb=disabled", "runtime.backend=local",
                                          *overrides])


@pytest.mark.parametrize("recipe", list(MIN_GAIN))
def test_toy_training_improves_held_out_reward(tmp_path, recipe):
    cfg = _config(tmp_path, recipe, "train.eval_every=0")  # evaluation does not touch the training state
    outputs = Trainer(cfg).run()
    records = [json.loads(line) for line in outputs.metrics.read_text().splitlines()]
    start, end = records[0]["eval/reward_mean"], records[-1]["eval/reward_mean"]
    assert end > start + MIN_GAIN[recipe], f"held-out reward {start:.3f} -> {end:.3f}"
    # before the first optimiser step of every iteration, new and old log-probs agree exactly
    assert all(r["train/first_ratio_max_dev"] == 0.0 for r in records[1:])
    assert outputs.reward_curve.stat().st_size > 0 and outputs.sample_grid.stat().st_size > 0
    # the checkpoint reloads into a fresh policy and reproduces the trained weights
    policy = load_policy(cfg)
    load_checkpoint(outputs.checkpoint, policy)
    state = policy.trainable_state_dict()
    with torch.no_grad():
        assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # LoRA moved from its zero init


def test_resume_gives_the_same_metrics_as_a_straight_run(tmp_path):
    straight = _config(tmp_path / "a", "toy-egrpo.yaml", "train.iterations=4", "train.checkpoint_every=2",
                       "train.eval_every=2", "plan.prompts_per_iteration=2")
    Trainer(straight).run()
    first_half = _config(tmp_path / "b", "toy-egrpo.yaml", "train.iterations=2", "train.checkpoint_every=2",
                         "train.eval_every=2", "plan.prompts_per_iteration=2")
    Trainer(first_half).run()
    second_half = _config(tmp_path / "b", "toy-egrpo.yaml", "train.iterations=4", "train.checkpoint_every=2",
                          "train.eval_every=2", "plan.prompts_per_iteration=2")
    assert resolve_checkpoint(second_half.run_dir).name == "iter_000002"
    Trainer(second_half, resume="auto").run()

    def records(cfg):
        return [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]

    a, b = records(straight), records(second_half)
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in ("reward/mean", "eval/reward_mean", "train/policy_loss", "train/grad_norm"):
            if key in ra:
                assert ra[key] == rb[key], (ra["iteration"], key)


def test_nan_rewards_are_dropped_from_training_and_counted(tmp_path):
    cfg = _config(tmp_path, "toy-egrpo.yaml", "plan.prompts_per_iteration=1", "plan.group_size=3")
    policy = load_policy(cfg)
    plans = build_plan(cfg, ["a red circle at the top left"], 0)
    result = run_plan(policy, plans, sampler_settings(cfg))
    n = len(result.samples)
    rewards = {name: torch.rand(n, generator=torch.Generator().manual_seed(1)) for name in cfg.rewards.weights}
    rewards["toy_shape"][[0, 4]] = math.nan
    steps, metrics = score_rollout(cfg, result, rewards)
    assert metrics["reward/nan_dropped"] == 2
    assert math.isfinite(metrics["reward/mean"])
    assert 0 not in steps["sample"] and 4 not in steps["sample"]
    assert torch.isfinite(steps["advantage"]).all() and len(steps) == len(result.train_steps) - 2


def test_sample_command_draws_base_and_checkpoint_rows(tmp_path):
    import subprocess
    import sys

    cfg = _config(tmp_path, "toy-egrpo.yaml", "train.iterations=1", "plan.prompts_per_iteration=1",
                  "train.eval_prompts=2", "train.eval_seeds=1")
    outputs = Trainer(cfg).run()
    out = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "egrpo.cli", "sample", str(RECIPES / "toy-egrpo.yaml"), "--checkpoint",
         str(cfg.run_dir), "--prompt", "a red circle at the top left", "--prompt", "a blue square at the top right",
         "--out", str(out), "--set", "runtime.backend=local"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.stat().st_size > 0 and "iter 1" in result.stdout and "base" in result.stdout
    assert outputs.checkpoint.name == "iter_000001"


def test_eval_command_reproduces_the_runs_own_start_and_end_evaluations(tmp_path):
    import subprocess
    import sys

    overrides = [f"run.dir={tmp_path}", "run.wandb=disabled", "runtime.backend=local", "train.eval_prompts=4",
                 "train.eval_seeds=2"]
    cfg = load_config(RECIPES / "toy-egrpo.yaml", [*overrides, "train.iterations=2"])
    outputs = Trainer(cfg).run()
    records = [json.loads(line) for line in outputs.metrics.read_text().splitlines()]
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "egrpo.cli", "eval", str(RECIPES / "toy-egrpo.yaml"), "--checkpoint",
         str(cfg.run_dir), "--out", str(out), *[a for o in overrides for a in ("--set", o)]],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split(",") for line in (out / "eval.csv").read_text().splitlines()[1:]]
    table = {name: (float(base), float(tuned)) for name, base, tuned, _ in rows}
    assert set(table) == {"reward_mean", "toy_colour", "toy_shape", "toy_position"}
    # same prompts, seeds and weights as the run's own evaluations before and after training
    for name, (base, tuned) in table.items():
        assert base == pytest.approx(records[0][f"eval/{name}"], abs=1e-6)
        assert tuned == pytest.approx(records[-1][f"eval/{name}"], abs=1e-6)
    assert table["reward_mean"][0] != table["reward_mean"][1]
    assert (out / "eval_grid.png").stat().st_size > 0 and "| toy_colour |" in (out / "eval.md").read_text()
    assert not (tmp_path / "toy-egrpo-eval" / "metrics.jsonl").read_text()  # the training run's log is untouched
    assert len(outputs.metrics.read_text().splitlines()) == 3


def test_falling_reward_components_are_plotted_and_named(tmp_path):
    """A held-out component that falls, or a weight-0 one, is what reward hacking looks like: named in a
    warning; a trained component that falls in training but not held-out is not."""
    from egrpo.report import falling_components, plot_reward_curve

    records = [{"iteration": 0, "eval/reward_mean": 1.0, "eval/a": 0.5, "eval/b": 0.22, "reward/b": 0.3},
               {"iteration": 5, "reward/mean": 1.2, "reward/a": 0.4, "reward/b": 0.2},
               {"iteration": 10, "eval/reward_mean": 1.3, "eval/a": 0.52, "eval/b": 0.14, "reward/b": 0.1}]
    weights = {"a": 1.0, "b": 0.0}
    warnings = falling_components(records, weights)
    assert len(warnings) == 2 and all("b (weight 0)" in w for w in warnings)
    assert "0.220 to 0.140" in warnings[0]
    assert falling_components(records, {"a": 1.0}) == []
    plot_reward_curve(records, tmp_path / "curve.png", "t", weights)
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_progress_in_a_log_file_is_lines_with_the_last_held_out_reward(tmp_path):
    """Not a terminal (a Ray job's log, CI): a line per 5% of the run naming the last held-out reward, and no
    progress bar's carriage returns."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "egrpo.cli", "train", "launch/configs/toy-egrpo.yaml", "--set", "runtime.backend=local",
         "--set", f"run.dir={tmp_path}", "--set", "train.iterations=3", "--set", "train.eval_every=2",
         "--set", "plan.prompts_per_iteration=1", "--set", "plan.group_size=2", "--set", "train.eval_prompts=2"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "iteration " in line and "/3: reward" in line]
    assert [line.split("iteration ")[1].split("/")[0] for line in lines] == ["1", "2", "3"]
    assert "last held-out reward nan" not in lines[1] and "\r" not in done.stderr  # iteration 2 evaluated
