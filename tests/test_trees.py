"""Shared computation and rollout trees (ALGORITHMS.md section 3; ../shared/research/branchgrpo.md): samples in
the same state share one transformer call in the rollout and in the learner, to float rounding; a tree's
leaves share their ancestors' steps; tree advantages follow BranchGRPO's rule; probed anchors are reused."""

import dataclasses
import random

import pytest
import torch
from test_sampling import LinearFlow

from egrpo.algo.advantages import tree_advantages
from egrpo.algo.loss import step_mean_and_std
from egrpo.batch import Batch
from egrpo.config import load_config
from egrpo.learner import GRPOLearner, make_minibatches
from egrpo.methods import EntropyGuidance, build_plan
from egrpo.sampling.plans import split_steps, tree_plan, uniform_split_points
from egrpo.sampling.rollout import SamplerSettings, run_plan
from egrpo.sampling.steps import NoiseSpec, sigma_schedule
from egrpo.trainer import load_policy, sampler_settings, score_rollout

PROMPTS = ["a red circle at the top left", "a blue square at the bottom right"]
STEPS = 6


def _settings(batch_size: int = 64) -> SamplerSettings:
    return SamplerSettings(sigma_schedule(STEPS, 3.0), NoiseSpec("flow_grpo", 0.7), batch_size=batch_size)


def _tree(between: str = "ode", splits=(1, 3), factor: int = 2, lengths=None):
    return tree_plan(PROMPTS, [11, 12], [list(splits)] * 2, lengths or [1] * STEPS, STEPS, factor, between,
                     random.Random(0))


def _nodes_per_step(plans) -> list[int]:
    """Distinct states at each schedule index, counted from the plans alone (a state = the steps taken)."""
    counts = [0] * STEPS
    for i in range(STEPS):
        states = set()
        for p in plans:
            taken = tuple(s for s in p.steps if s.start < i)
            if p.branch_from <= i and any(s.start == i for s in p.steps):
                states.add((p.prompt, p.seed, taken))
        counts[i] = len(states)
    return counts


@pytest.mark.parametrize("between", ["ode", "sde"])
def test_a_tree_splits_at_its_split_steps_and_leaves_share_their_ancestors(between):
    plans = _tree(between, splits=(1, 3), factor=3)
    assert len(plans) == 2 * 9 and {p.group for p in plans} == {0, 1}  # factor^splits leaves, group = tree
    tree = [p for p in plans if p.group == 0]
    assert all(p.branch_from == 1 for p in tree)  # the anchor up to the first split
    for a in tree:
        for b in tree:
            if a is b:
                continue
            same_first_child = a.steps[0] == b.steps[0]
            # leaves below the same child of the first split share everything up to the second split
            assert same_first_child == (a.steps[:2] == b.steps[:2])
            assert a.steps[2:] != b.steps[2:] or a.steps == b.steps
    sde = [[s.start for s in p.steps if s.sde] for p in tree]
    assert all(steps == ([1, 3] if between == "ode" else [1, 2, 3, 4, 5]) for steps in sde)
    assert all(s.train == s.sde for p in tree for s in p.steps)
    assert len({p.steps[0].noise_seed for p in tree}) == 3  # one noise per child of the first split


def test_tree_rollout_shares_calls_and_equals_each_leaf_run_alone():
    plans = _tree("ode", splits=(1, 3))
    together = run_plan(LinearFlow(), plans, _settings())
    # forwards: the anchor to step 1, then one per distinct state at each step
    assert together.transformer_calls == 2 * 1 + sum(_nodes_per_step(plans)) == 2 + 2 * (1 + 2 + 2 + 4 + 4)
    for k, plan in enumerate(plans):
        alone = run_plan(LinearFlow(), [plan], _settings())
        torch.testing.assert_close(alone.samples["images"][0].float(), together.samples["images"][k].float(),
                                   atol=1, rtol=0)  # uint8 images: batching may move a value by one level
    steps = together.train_steps
    assert len(steps) == 2 * (2 + 4)  # each trained transition once: 2 edges at the first split, 4 at the second
    assert sorted(len(leaves) for leaves in steps["leaves"]) == [1] * 8 + [2] * 4
    for leaves, depth in zip(steps["leaves"], steps["depth"], strict=True):
        assert depth in (2, 4) and len(leaves) == (2 if depth == 2 else 1)
    # siblings leave the same state: the same input id and the same input latent
    for state in set(steps["input"]):
        rows = [r for r, s in enumerate(steps["input"]) if s == state]
        assert len(rows) == 2 and torch.equal(steps["x_in"][rows[0]], steps["x_in"][rows[1]])


def test_branch_plan_follows_branchgrpo_split_points():
    assert uniform_split_points(20, 4) == [0, 5, 10, 15]  # BranchGRPO's parse_split_points, T = 20, R = 4
    cfg = load_config("launch/configs/toy-branch.yaml")
    plans = build_plan(cfg, PROMPTS, 0)
    assert len(plans) == 2 * 16 and all(p.branch_from == 0 for p in plans)
    assert all(p.explore_steps == tuple(range(8)) for p in plans)  # SDE between splits too
    first = [p for p in plans if p.group == 0]
    assert len({p.steps[0].noise_seed for p in first}) == 2 and len({p.steps[1].noise_seed for p in first}) == 2
    assert len({p.steps[2].noise_seed for p in first}) == 4 and len({p.steps[7].noise_seed for p in first}) == 16


def test_split_steps_are_the_peaks_filled_up_by_the_highest_other_steps():
    curve = [0.1, 0.5, 0.2, 0.4, 0.3, 0.35]
    assert split_steps(curve, 2) == [1, 3]  # two local maxima
    assert split_steps(curve, 4) == [1, 3, 4, 5]  # maxima 1, 3, 5, then the highest other step
    assert split_steps(curve, 3) == [1, 3, 5]


def _branchgrpo_advantages(rewards, tree_of, depth_of, leaves_of):
    """BranchGRPO's compute_hierarchical_advantages_by_depth (research notes 2.2-2.3), written from its
    description: a node's reward is the mean of its leaves; per tree and depth, (r - mean) / (std + 1e-8) with
    the unbiased std; a depth with one node, or std < 1e-6, gets 0; then clamp to [-5, 5]."""
    values = [sum(rewards[k] for k in leaves) / len(leaves) for leaves in leaves_of]
    out = [0.0] * len(values)
    for key in {(t, d) for t, d in zip(tree_of, depth_of, strict=True)}:
        members = [e for e in range(len(values)) if (tree_of[e], depth_of[e]) == key]
        if len(members) < 2:
            continue
        r = torch.tensor([values[e] for e in members], dtype=torch.float64)
        if r.std() < 1e-6:
            continue
        for e, a in zip(members, ((r - r.mean()) / (r.std() + 1e-8)).tolist(), strict=True):
            out[e] = max(-5.0, min(5.0, a))
    return out


def test_tree_advantages_equal_branchgrpo_and_drop_nan_leaves():
    result = run_plan(LinearFlow(), _tree("sde", splits=(1, 3)), _settings())
    steps, groups = result.train_steps, result.samples["group"]
    reward = torch.rand(len(result.samples), generator=torch.Generator().manual_seed(0))
    tree_depth = [groups[s] * 100 + d for s, d in zip(steps["sample"], steps["depth"], strict=True)]
    ours = tree_advantages({"r": reward}, steps["leaves"], tree_depth, {"r": 1.0}, ddof=1)
    expected = _branchgrpo_advantages(reward.tolist(), [groups[s] for s in steps["sample"]], steps["depth"],
                                      steps["leaves"])
    torch.testing.assert_close(ours.values, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    assert ours.valid.all() and ours.dropped_nan == 0
    # a NaN leaf: left out of its ancestors' means, and its own edges are not trained
    reward[3] = float("nan")
    dropped = tree_advantages({"r": reward}, steps["leaves"], tree_depth, {"r": 1.0}, ddof=1)
    assert dropped.dropped_nan == 1
    only_leaf_3 = [e for e, leaves in enumerate(steps["leaves"]) if leaves == [3]]
    assert only_leaf_3 and not dropped.valid[only_leaf_3].any()
    clean = torch.where(torch.isnan(reward), torch.zeros_like(reward), reward).tolist()
    kept = [[k for k in leaves if k != 3] for leaves in steps["leaves"]]
    valid = [e for e, leaves in enumerate(kept) if leaves]
    expected = _branchgrpo_advantages(clean, [groups[steps["sample"][e]] for e in valid],
                                      [steps["depth"][e] for e in valid], [kept[e] for e in valid])
    torch.testing.assert_close(dropped.values[valid], torch.tensor(expected, dtype=torch.float32), atol=1e-5,
                               rtol=1e-5)


def _toy(tmp_path, recipe: str, *overrides: str):
    return load_config(f"launch/configs/{recipe}", [f"run.dir={tmp_path}", "run.wandb=disabled",
                                                    "runtime.backend=local", *overrides])


def test_shared_forward_equals_one_forward_per_row_gradients_included(tmp_path):
    """E-GRPO's G branches of one group leave the same anchor latent: the learner runs the policy once for
    them (VisualGRPO does too), which must equal one forward per branch, loss and gradients alike."""
    cfg = _toy(tmp_path, "toy-egrpo.yaml", "plan.prompts_per_iteration=1", "plan.group_size=4")
    policy = load_policy(cfg)
    with torch.no_grad():  # a non-zero adapter, so that the gradients reach every LoRA matrix
        for p in policy.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    result = run_plan(policy, build_plan(cfg, PROMPTS[:1], 0), sampler_settings(cfg))
    steps = result.train_steps
    assert len(set(steps["input"])) == 4 and len(steps) == 16  # 4 groups of 4 branches
    per_row = Batch(steps.tensors, {k: v for k, v in steps.meta.items() if k != "input"})

    def loss_and_grads(batch):
        policy.transformer.zero_grad(set_to_none=True)
        mean, _, forwards = step_mean_and_std(policy, batch)
        assert forwards == len(set(batch.meta.get("input", range(len(batch)))))
        loss = ((mean - batch["x_out"]) ** 2).flatten(1).mean(1) @ torch.linspace(-1, 1, len(batch))
        loss.backward()
        return mean.detach(), [p.grad.clone() for p in policy.trainable_parameters() if p.grad is not None]

    shared_mean, shared_grads = loss_and_grads(steps)
    row_mean, row_grads = loss_and_grads(per_row)
    assert len(shared_grads) == len(row_grads) > 0
    torch.testing.assert_close(shared_mean, row_mean, atol=1e-6, rtol=1e-5)
    for a, b in zip(shared_grads, row_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    # the learner counts the forwards it ran: 4 distinct inputs, for old log-probs and for the loss
    scored, _ = score_rollout(cfg, result, {name: torch.rand(len(result.samples)) for name in cfg.rewards.weights})
    learner = GRPOLearner(policy, cfg.train)
    metrics = learner.train_iteration(make_minibatches(scored, cfg.train.batch_size, seed=0))
    assert metrics["nfe/train"] == 2 * len(set(scored["input"])) and metrics["train/first_ratio_max_dev"] == 0.0


def test_minibatches_keep_rows_of_one_state_together():
    inputs = [k // 3 for k in range(14)]  # units of 3 rows (the last of 2)
    steps = Batch({"v": torch.arange(14)}, {"input": inputs})
    minibatches = make_minibatches(steps, batch_size=4, seed=1, min_size=2)
    seen = []
    for mb in minibatches:
        units = mb["input"]
        assert len(mb) >= 4 or mb is minibatches[-1]
        assert all(units.count(u) == inputs.count(u) for u in set(units))  # no unit is cut
        seen += mb["v"].tolist()
    assert sorted(seen) == list(range(14))


def test_rollout_reuses_probed_anchors(tmp_path):
    """AEGPO's probe pass is the rollout's anchor: run_plan given those latents computes the same samples
    without recomputing the anchor steps."""
    from egrpo.sampling.rollout import ProbeRequest, probe_entropies
    from egrpo.trainer import probe_settings

    cfg = _toy(tmp_path, "toy-aegpo.yaml")
    policy, settings = load_policy(cfg), sampler_settings(cfg)
    requests = [ProbeRequest(p, 5 + k, False) for k, p in enumerate(PROMPTS)]
    probes, anchors = probe_entropies(policy, requests, settings, probe_settings(cfg), cfg.aegpo_peak_steps)
    assert probes.entropy.shape == (2, cfg.aegpo_peak_steps)
    plans = build_plan(cfg, PROMPTS, 0, EntropyGuidance([8, 4], [[2, 3], [1, 2]]))
    # aegpo seeds a prompt's noise by the prompt (plans.prompt_seed); here the requests' seeds
    plans = [dataclasses.replace(p, seed=5 + PROMPTS.index(p.prompt)) for p in plans]
    fresh = run_plan(policy, plans, settings)
    reused = run_plan(policy, plans, settings, anchors)
    assert torch.equal(fresh.samples["images"], reused.samples["images"])
    assert fresh.transformer_calls - reused.transformer_calls == 2 + 1  # the anchors to steps 2 and 1


def test_plan_command_shows_a_branch_recipes_split_steps_and_leaves():
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "egrpo.cli", "plan", "launch/configs/toy-branch.yaml", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout)
    assert info["splits"] == [0, 2, 4, 6] and info["leaves"] == 16
