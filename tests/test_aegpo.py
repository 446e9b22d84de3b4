"""AEGPO's two signals as the scheduler uses them: dE budgets (global) and entropy peaks (local)."""

import json
from pathlib import Path

import pytest
import torch

from egrpo.algo.budgets import allocate_rollouts, apportion, relative_entropy_change
from egrpo.config import ConfigError, load_config
from egrpo.data.prompts import load_prompts
from egrpo.methods import EntropyGuidance, aegpo_merge_lengths, build_plan
from egrpo.sampling.plans import entropy_peaks, prompt_seed, split_steps
from egrpo.sampling.rollout import ProbeResult
from egrpo.scheduler import Scheduler

POLICIES = ("uniform", "median_split", "proportional")

# ----------------------------------------------------------------------------------------------- dE and budgets


def test_delta_entropy_is_zero_when_the_policy_is_the_reference():
    curves = torch.rand(5, 8) + 0.1
    assert torch.equal(relative_entropy_change(curves, curves.clone()), torch.zeros(5))
    moved = curves.clone()
    moved[2] *= 1.1
    assert torch.allclose(relative_entropy_change(moved, curves), torch.tensor([0, 0, 0.1, 0, 0.0]), atol=1e-6)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_keeps_the_total_budget_and_the_bounds(policy):
    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        prompts = 1 + trial % 7
        delta = (torch.rand(prompts, generator=generator) ** 3).tolist()
        total = prompts * (2 + trial % 9)
        sizes = allocate_rollouts(delta, total, policy, g_min=2, g_max=16, alpha=1.5)
        assert sum(sizes) == total
        assert all(2 <= g <= 16 for g in sizes)


@pytest.mark.parametrize("policy", POLICIES)
def test_equal_delta_entropy_gives_uniform(policy):
    assert allocate_rollouts([0.3] * 4, 32, policy, 2, 32) == [8] * 4
    assert allocate_rollouts([0.0] * 4, 32, policy, 2, 32) == [8] * 4  # first iteration: policy == reference


def test_median_split_gives_the_documented_split():
    # 4 prompts, budget 4 x 12 = 48: the two at or above the median get 16/24 of it, the others 8/24
    assert allocate_rollouts([0.1, 0.4, 0.2, 0.3], 48, "median_split", 2, 32) == [8, 16, 8, 16]
    # odd count: the median prompt itself is "at or above"; weights 16,16,8 -> 48 * (16, 16, 8) / 40
    assert allocate_rollouts([0.5, 0.2, 0.9], 48, "median_split", 2, 32) == [19, 10, 19]


def test_proportional_follows_delta_entropy_within_the_clamp():
    sizes = allocate_rollouts([0.1, 0.2, 0.4], 28, "proportional", 2, 32)
    assert sizes == [4, 8, 16]
    clamped = allocate_rollouts([0.0, 0.5, 1.0, 3.0], 32, "proportional", 2, 12)
    assert clamped == [2, 6, 12, 12]
    assert allocate_rollouts([0.1, 0.2], 30, "proportional", 2, 32, alpha=2.0) == [6, 24]


def test_apportion_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="cannot give 3 prompts"):
        apportion([1, 1, 1], 5, 2, 8)


# ------------------------------------------------------------------------------------------------------ peaks


@pytest.mark.parametrize(
    "curve, k, expected",
    [
        ([0.1, 0.5, 0.2, 0.7, 0.3], 4, [1, 3]),  # two interior maxima
        ([0.1, 0.5, 0.2, 0.7, 0.3], 1, [3]),  # top-1 is the higher one
        ([0.9, 0.5, 0.2, 0.3, 0.8], 4, [0, 4]),  # both edges are maxima
        ([0.1, 0.5, 0.5, 0.5, 0.2], 4, [1]),  # a plateau is one peak at its first step
        ([0.1, 0.5, 0.5, 0.6, 0.2], 4, [3]),  # a shelf on the way up is no peak
        ([0.4, 0.4, 0.4], 2, [0]),  # a constant curve is one run
        ([0.1, 0.2, 0.3, 0.4], 4, [3]),  # monotone: fewer peaks than k
        ([0.3, 0.9, 0.3, 0.9, 0.3], 1, [1]),  # equal heights: the earlier step
        ([0.5], 3, [0]),
    ],
)
def test_entropy_peaks(curve, k, expected):
    assert entropy_peaks(curve, k) == expected


# --------------------------------------------------------------------------------------------- scheduler + plan


def _aegpo_config(*extra: str):
    """The toy aegpo recipe in its independent reading (the tree reading has tests of its own)."""
    return load_config("launch/configs/toy-aegpo.yaml",
                       ["plan.prompts_per_iteration=3", "aegpo.rollout=independent", "plan.group_size=8", *extra])


def test_scheduler_turns_probes_into_budgets_and_peaks(tmp_path):
    prompts_file = tmp_path / "prompts.txt"  # three prompts: every draw picks the same three
    prompts_file.write_text("\n".join(load_prompts("toy:train")[:3]) + "\n")
    cfg = _aegpo_config("aegpo.peaks=2", "aegpo.budget=median_split", f"data.prompts={prompts_file}")
    scheduler = Scheduler(cfg)
    requests = scheduler.draw(0)
    assert [r.reference for r in requests] == [True] * 3
    assert [r.seed for r in requests] == [prompt_seed(cfg.run.seed, r.prompt) for r in requests]
    steps = cfg.sampler.steps
    reference = torch.full((3, steps), 0.5)
    entropy = reference.clone()
    entropy[1] *= 1.2  # prompt 1 moved the most
    entropy[0, 2] = 0.6  # peaks of prompt 0: a bump at step 2 (plateau edges are not lower than it)
    plans = scheduler.plan(0, ProbeResult(entropy, reference, 0))
    groups: dict[int, list] = {}
    for p in plans:
        groups.setdefault(p.group, []).append(p)
    sizes = {g[0].prompt: len(g) for g in groups.values()}
    prompts = [r.prompt for r in requests]
    total = cfg.plan.prompts_per_iteration * cfg.plan.group_size
    delta = relative_entropy_change(entropy, reference).tolist()  # [0.025, 0.2, 0]
    expected = allocate_rollouts(delta, total, "median_split", 2, 32)
    assert [sizes[p] for p in prompts] == expected
    assert sum(expected) == total and expected[1] > expected[2]
    explore = {(p.prompt, p.explore_steps) for p in plans}
    assert (prompts[0], (2,)) in explore
    scheduler.receive(list(range(len(plans))))
    metrics = scheduler.check_complete()
    assert metrics["entropy/dE_max"] == pytest.approx(0.2)
    assert metrics["explore/step_2"] >= 1
    assert scheduler.records[prompts[1]].dE == [pytest.approx(0.2)]
    # E_ref is cached per (prompt, seed), also across a checkpoint: the next draw does not ask for it again
    restored = Scheduler(cfg)
    restored.load_state_dict(json.loads(json.dumps(scheduler.state_dict())))
    assert [r.reference for r in restored.draw(1)] == [False] * 3


def test_aegpo_plan_with_merge_uses_egrpo_merge_lengths():
    cfg = _aegpo_config()  # the recipe merges
    lengths = aegpo_merge_lengths(cfg)
    assert len(lengths) == cfg.sampler.steps and max(lengths) > 1
    assert lengths[:4] == [1, 1, 1, 2]  # the toy schedule (`egrpo plan launch/configs/toy-egrpo.yaml`)
    plans = build_plan(cfg, ["a red circle", "a blue square"], 0, EntropyGuidance([4, 3], [[0, 3], [1, 2]]))
    assert [p.group for p in plans] == [0] * 4 + [1] * 3  # group = prompt
    first = plans[0]
    assert first.branch_from == 0 and first.explore_steps == (0, 3) and first.merge_lengths == (1, 2)
    assert [(s.start, s.length, s.sde) for s in first.steps] == [
        (0, 1, True), (1, 1, False), (2, 1, False), (3, 2, True), (5, 1, False), (6, 1, False), (7, 1, False)]
    assert plans[4].branch_from == 1 and plans[4].explore_steps == (1, 2)
    assert len({seed for p in plans for seed in p.noise_seeds}) == 14  # each sample's own noise at each peak
    without = build_plan(_aegpo_config("aegpo.merge=false"), ["a red circle"], 0, EntropyGuidance([4], [[0, 3]]))
    assert without[0].merge_lengths == (1, 1)
    skipped = build_plan(cfg, ["a red circle"], 0, EntropyGuidance([2], [[3, 4]]))  # 3 merges over 4
    assert skipped[0].explore_steps == (3,)


def test_aegpo_settings_are_checked_only_for_aegpo():
    assert load_config("launch/configs/toy-egrpo.yaml", ["plan.group_size=48"]).plan.group_size == 48


def test_aegpo_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="aegpo.g_max"):
        _aegpo_config("aegpo.g_max=4")  # group_size 8 does not fit
    with pytest.raises(ConfigError, match="aegpo.budget"):
        _aegpo_config("aegpo.budget=greedy")
    with pytest.raises(ConfigError, match="aegpo.peaks"):
        _aegpo_config("aegpo.peaks=0")


def test_plan_command_shows_attention_entropy_peaks_and_budgets(tmp_path):
    import subprocess
    import sys

    png = tmp_path / "entropy_curves.png"  # a plan before training writes here (the current folder)...
    recipe = Path("launch/configs/toy-aegpo.yaml").resolve()
    result = subprocess.run(
        [sys.executable, "-m", "egrpo.cli", "plan", str(recipe), "--json", "--set", "plan.prompts_per_iteration=3",
         "--set", f"run.dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert not (tmp_path / "runs").exists()  # ...and creates no run folder, since nothing is trained
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout)
    cfg = load_config("launch/configs/toy-aegpo.yaml")  # the tree reading
    assert info["rollout"] == "tree" and len(info["attention_entropy"]) == 3
    for prompt, curve in info["attention_entropy"].items():
        assert len(curve) == cfg.aegpo_peak_steps and all(0 < e <= 1 for e in curve)  # only where peaks are sought
        assert info["delta_entropy"][prompt] == 0.0  # base weights: the policy is its reference
        # equal dE: every prompt gets the mean budget, 12, and so round(log2 12) = 4 split steps, 16 leaves
        assert info["splits"][prompt] == split_steps(curve, 4) and info["leaves"][prompt] == 16
    assert info["merge_lengths"] and png.stat().st_size > 0
