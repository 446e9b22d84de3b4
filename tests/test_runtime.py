"""The Ray runtime on a real local Ray: it computes what the in-process loop computes, resumes, survives
killed actors, and refuses impossible clusters quickly."""

import json
import os
import time
from pathlib import Path

import pytest
import ray
import torch

from egrpo.config import load_config
from egrpo.runtime.driver import ClusterError, RayTrainer, connect
from egrpo.runtime.weight_sync import BroadcastSync
from egrpo.trainer import Trainer, load_policy

UPDATE_RTOL = 1e-3  # measured 2.3e-5 (2 learners, ZeRO 2, 2 minibatches)
RECIPE = Path(__file__).parents[1] / "launch" / "configs" / "toy-egrpo.yaml"
SMALL = ["plan.prompts_per_iteration=2", "plan.group_size=3", "train.eval_every=0", "train.eval_prompts=4",
         "run.wandb=disabled", "runtime.dashboard=false", "runtime.timeout_s=300"]


def _config(run_dir, *overrides):
    return load_config(RECIPE, [f"run.dir={run_dir}", *SMALL, *overrides])


def _records(cfg):
    return [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_unreachable_address_is_named(tmp_path):
    assert not ray.is_initialized()  # runs first in this module, before the shared local Ray starts
    cfg = _config(tmp_path, "runtime.address=127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(ClusterError, match="127.0.0.1:9"):
        connect(cfg)
    assert time.perf_counter() - start < 60


def test_the_logged_dashboard_address_is_where_ray_bound_it(tmp_path):
    """With 8265 taken, Ray binds its dashboard elsewhere: egrpo logs that address, and it answers."""
    import socket
    import subprocess
    import sys

    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 8265))
        blocker.listen()
    except OSError:
        pass  # something already holds 8265: the case under test as well
    # the child logs through egrpo's logger, then fetches the address it logged, while its Ray is up
    code = "\n".join([
        "import io, logging, urllib.request",
        "from egrpo.config import load_config",
        "from egrpo.runtime.driver import connect",
        "captured = io.StringIO(); logging.getLogger('egrpo').addHandler(logging.StreamHandler(captured))",
        "logging.getLogger('egrpo').setLevel(logging.INFO)",
        f"connect(load_config({str(RECIPE)!r}, ['runtime.dashboard=true']))",
        "line = next(x for x in captured.getvalue().splitlines() if 'Ray dashboard at ' in x)",
        "address = line.split('Ray dashboard at ')[1].strip()",
        "print(address, urllib.request.urlopen(address, timeout=30).status)",
    ])
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).parents[1])
    finally:
        blocker.close()
    assert done.returncode == 0, done.stderr[-3000:]
    address, status = done.stdout.split()[-2:]
    assert address.startswith("http://") and not address.endswith(":8265") and status == "200", done.stdout


@pytest.mark.parametrize("recipe", ["toy-egrpo.yaml", "toy-branch.yaml"])
def test_one_iteration_on_ray_equals_the_in_process_loop(tmp_path, local_ray, recipe):
    """Same config and seeds: same rewards, advantages and updated weights (2 rollout workers, 2 learners).
    BranchGRPO's trees: transitions shared by several leaves, and state ids, across two workers' shards."""
    common = ["train.iterations=1", "runtime.rollout_workers=2", "runtime.learners=2", "runtime.zero_stage=2",
              "tree.splits=2"]
    reference = Trainer(load_config(RECIPE.with_name(recipe), [f"run.dir={tmp_path / 'local'}", *SMALL,
                                                               "runtime.backend=local", *common]))
    reference.run()
    distributed = RayTrainer(load_config(RECIPE.with_name(recipe), [f"run.dir={tmp_path / 'ray'}", *SMALL, *common]))
    try:
        metrics = distributed.iteration(0)
        ray_weights = ray.get(distributed.learners.actors[0].trainable_state_dict.remote())
        other_rank = ray.get(distributed.learners.actors[1].trainable_state_dict.remote())
    finally:
        distributed.close()
    local = _records(reference.cfg)[1]
    # the same rollouts and rewards, up to float rounding (the two workers batch the transformer differently)
    assert metrics["reward/mean"] == pytest.approx(local["reward/mean"], rel=1e-5)
    samples = 2 * 4 * 3 if recipe == "toy-egrpo.yaml" else 2 * 2**2  # E-GRPO: 4 active steps x G; trees: 4 leaves
    assert metrics["samples/received"] == metrics["samples/requested"] == samples
    assert metrics["train/steps"] == local["train/steps"] and metrics["nfe/rollout"] == local["nfe/rollout"]
    assert metrics["train/first_ratio_max_dev"] == 0.0
    # Minibatches hold whole groups (their rows share a forward), whose advantages sum to 0: the loss is a
    # cancelling sum of -A rho, about -sum A (rho - 1) ~ 1e-5, so it is compared at the scale of that sum.
    assert metrics["train/policy_loss"] == pytest.approx(local["train/policy_loss"], rel=1e-4, abs=2e-7)
    # Two ranks each average half of every minibatch: the full-batch gradient up to float rounding. Adam turns
    # LoRA A's near-zero gradients (exactly zero while B = 0) into lr-sized steps, so rounding shows there;
    # the update as a whole must agree to UPDATE_RTOL.
    local_weights = reference.policy.trainable_state_dict()
    initial = load_policy(reference.cfg).trainable_state_dict()
    diff = sum(((ray_weights[k] - local_weights[k]) ** 2).sum() for k in initial) ** 0.5
    update = sum(((local_weights[k] - initial[k]) ** 2).sum() for k in initial) ** 0.5
    print(f"relative update difference {float(diff / update):.2e}")
    assert update > 0 and diff / update < UPDATE_RTOL
    for key in local_weights:
        assert torch.equal(ray_weights[key], other_rank[key])  # ranks stay in sync


def test_aegpo_on_ray_probes_budgets_and_explores_like_the_in_process_loop(tmp_path, local_ray):
    """AEGPO's probe pass runs on the rollout workers (split over two), its E_ref cache and dE budgets in the
    scheduler actor: two iterations give the in-process loop's entropies, budgets and exploration steps."""
    recipe = RECIPE.with_name("toy-aegpo.yaml")
    common = [*SMALL, "train.iterations=2", "plan.prompts_per_iteration=3", "runtime.rollout_workers=2"]
    reference = Trainer(load_config(recipe, [f"run.dir={tmp_path / 'local'}", *common, "runtime.backend=local"]))
    reference.run()
    cfg = load_config(recipe, [f"run.dir={tmp_path / 'ray'}", *common])
    RayTrainer(cfg).run()
    for local, distributed in zip(_records(reference.cfg)[1:], _records(cfg)[1:], strict=True):
        assert distributed["nfe/probe"] == local["nfe/probe"] > 0
        assert distributed["entropy/mean"] == pytest.approx(local["entropy/mean"], rel=1e-5)
        assert distributed["entropy/dE_max"] == pytest.approx(local["entropy/dE_max"], rel=1e-2, abs=1e-7)
        # the rollouts reuse the probes' anchors on Ray too (object store): the same forwards as in-process
        for key in ("budget/min", "budget/max", "samples/requested", "explore/peaks", "nfe/rollout", "nfe/train"):
            assert distributed[key] == local[key], key
        assert distributed["reward/mean"] == pytest.approx(local["reward/mean"], rel=1e-4)
    assert _records(cfg)[2]["entropy/dE_max"] > 0  # after one update the policy has moved from its reference


def test_resume_on_ray_matches_a_straight_run(tmp_path, local_ray):
    straight = _config(tmp_path / "a", "train.iterations=4", "train.checkpoint_every=2")
    RayTrainer(straight).run()
    RayTrainer(_config(tmp_path / "b", "train.iterations=2", "train.checkpoint_every=2")).run()
    resumed = _config(tmp_path / "b", "train.iterations=4", "train.checkpoint_every=2")
    RayTrainer(resumed, resume="auto").run()
    a, b = _records(straight), _records(resumed)
    assert [r["iteration"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in ("reward/mean", "eval/reward_mean", "train/policy_loss"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["iteration"], key)


@pytest.mark.parametrize("role", ["rollout", "reward"])
def test_a_killed_rollout_worker_or_reward_server_is_restarted(tmp_path, local_ray, role):
    cfg = _config(tmp_path, "train.iterations=2", f"chaos.kill={role}", "chaos.at_iteration=1")
    RayTrainer(cfg).run()
    records = _records(cfg)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert all(r["samples/received"] == r["samples/requested"] for r in records[1:])


def test_a_killed_learner_stops_with_a_message_and_the_run_resumes(tmp_path, local_ray):
    cfg = _config(tmp_path, "train.iterations=3", "train.checkpoint_every=1", "chaos.kill=learner",
                  "chaos.at_iteration=1")
    with pytest.raises(ClusterError, match="resume"):
        RayTrainer(cfg).run()
    resumed = _config(tmp_path, "train.iterations=3", "train.checkpoint_every=1")
    RayTrainer(resumed, resume="auto").run()
    assert [r["iteration"] for r in _records(resumed)] == [0, 1, 2, 3]


def test_an_impossible_cluster_request_fails_fast_and_names_it(tmp_path, local_ray):
    start = time.perf_counter()
    with pytest.raises(ClusterError, match=r"asks for .*CPUs.*the cluster has 8 CPUs"):
        RayTrainer(_config(tmp_path, "runtime.rollout_workers=40"))
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_weight_sync_reaches_every_rollout_worker_intact(tmp_path, local_ray, finetune):
    cfg = _config(tmp_path, "train.iterations=1", "runtime.sync_check=true", f"model.finetune={finetune}",
                  "train.lr=1e-4")
    trainer = RayTrainer(cfg)
    try:
        metrics = trainer.iteration(0)
    finally:
        trainer.close()
    assert metrics["sync/max_checksum_error"] == 0.0  # every worker holds exactly rank 0's new weights
    assert metrics["weights_version"] == 1 and metrics["staleness/max"] == 0
    # LoRA goes through the object store, full weights by torch.distributed broadcast (runtime.weight_sync=auto)
    assert isinstance(trainer.sync, BroadcastSync) == (finetune == "full")


def test_learners_without_text_encoders_train_on_embeddings_from_the_rollouts(tmp_path, local_ray):
    reference = Trainer(_config(tmp_path / "local", "runtime.backend=local", "train.iterations=1"))
    reference.run()
    cfg = _config(tmp_path / "ray", "train.iterations=1", "model.learner_text_encoders=false")
    trainer = RayTrainer(cfg)
    try:
        metrics = trainer.iteration(0)
        encoder = ray.get(trainer.learners.actors[0].__ray_call__.remote(
            lambda self: self.learner.policy.pipe.text_encoder))
    finally:
        trainer.close()
    assert encoder is None  # freed
    local = _records(reference.cfg)[1]
    assert metrics["train/first_ratio_max_dev"] == 0.0
    # Minibatches hold whole groups (their rows share a forward), whose advantages sum to 0: the loss is a
    # cancelling sum of -A rho, about -sum A (rho - 1) ~ 1e-5, so it is compared at the scale of that sum.
    assert metrics["train/policy_loss"] == pytest.approx(local["train/policy_loss"], rel=1e-4, abs=2e-7)
    assert metrics["train/grad_norm"] == pytest.approx(local["train/grad_norm"], rel=1e-4)


def test_evaluation_on_ray_loads_a_checkpoint_and_matches_the_run(tmp_path, local_ray):
    """What `egrpo eval` does on Ray: held-out rewards of the base weights, then of a checkpoint sent to the
    rollout workers, equal the training run's own first and last evaluations."""
    trained = _config(tmp_path / "local", "runtime.backend=local", "train.iterations=2")
    outputs = Trainer(trained).run()
    records = _records(trained)
    trainer = RayTrainer(_config(tmp_path / "ray", "train.iterations=2"))
    try:
        base, _ = trainer.evaluate()
        trainer.load_weights(outputs.checkpoint)
        tuned, _ = trainer.evaluate()
    finally:
        trainer.close()
    assert base["eval/reward_mean"] == pytest.approx(records[0]["eval/reward_mean"], abs=1e-5)
    assert tuned["eval/reward_mean"] == pytest.approx(records[-1]["eval/reward_mean"], abs=1e-5)
    assert base["eval/reward_mean"] != tuned["eval/reward_mean"]


def test_reward_servers_run_in_their_own_runtime_env(tmp_path, local_ray):
    env_file = tmp_path / "reward_env.yaml"  # what a reward with its own packages would give (pip, conda, ...)
    env_file.write_text("env_vars:\n  EGRPO_REWARD_ENV: own\n")
    cfg = _config(tmp_path, "train.iterations=1", f"rewards.runtime_env={env_file}")
    trainer = RayTrainer(cfg)
    try:
        def read(actor):
            return ray.get(actor.__ray_call__.remote(lambda self: os.environ.get("EGRPO_REWARD_ENV")))

        assert read(trainer.reward.actors[0]) == "own"
        assert read(trainer.rollout.actors[0]) is None
        assert trainer.iteration(0)["samples/received"] > 0  # and it scores as before
    finally:
        trainer.close()


def test_full_weight_broadcast_survives_a_restarted_rollout_worker(tmp_path, local_ray):
    cfg = _config(tmp_path, "model.finetune=full", "train.lr=1e-4", "runtime.sync_check=true",
                  "chaos.kill=rollout", "chaos.at_iteration=1")
    trainer = RayTrainer(cfg)
    try:
        records = [trainer.iteration(0), trainer.iteration(1)]
    finally:
        trainer.close()
    assert trainer.sync.generation == 1  # the group was formed, then re-formed once for the restarted worker
    for metrics in records:
        assert metrics["sync/max_checksum_error"] == 0.0
        assert metrics["samples/received"] == metrics["samples/requested"]
        assert metrics["staleness/max"] == 0


def test_one_step_off_overlap_trains_on_rollouts_one_version_old(tmp_path, local_ray):
    cfg = _config(tmp_path, "train.iterations=3", "runtime.overlap=true")
    RayTrainer(cfg).run()
    records = _records(cfg)[1:]
    assert [r["staleness/max"] for r in records] == [0, 1, 1]  # iterations 1 and 2 were rolled out early
    assert all(r["samples/received"] == r["samples/requested"] for r in records)
    assert all(r["train/first_ratio_max_dev"] == 0.0 for r in records)


def test_nan_drops_leave_uneven_rows_that_two_zero3_learners_train_on(tmp_path, local_ray):
    """The issue's reproduction (`--set plan.group_size=3 train.batch_size=7 train.micro_batch_size=1
    runtime.learners=2 runtime.zero_stage=3`: gloo's "Received data size doesn't match" before the fix), with
    NaN rewards on top: the reward servers drop the first sample of every shard, so the trained rows are
    whatever is left. Two iterations train, the ranks stay equal, and the driver never holds a pixel or a
    latent: the shard summaries carry neither, the images go to the reward servers as uint8 by reference."""
    cfg = _config(tmp_path, "train.iterations=2", "train.batch_size=7", "train.micro_batch_size=1",
                  "runtime.learners=2", "runtime.zero_stage=3")
    trainer = RayTrainer(cfg)

    def poison(server):  # runs inside each RewardServer (defined here, so Ray pickles it by value)
        for model in server.models:
            def first_sample_nan(images, prompts, score=model.score):
                rewards = score(images, prompts)
                for values in rewards.values():
                    values[0] = float("nan")
                return rewards

            model.score = first_sample_nan

    try:
        ray.get([server.__ray_call__.remote(poison) for server in trainer.reward.actors])
        planned = trainer._start(0)
        _, shards = trainer._collect(planned.plans, planned.rollouts)
        for shard in shards:
            assert "images" not in shard.summary.result.samples.tensors
            assert not {"x_in", "x_out"} & set(shard.summary.result.train_steps.tensors)
            assert ray.get(shard.images)["images"].dtype == torch.uint8
        trainer.prefetched = planned  # the iteration goes on from this plan
        records = [trainer.iteration(0), trainer.iteration(1)]
        states = ray.get([a.trainable_state_dict.remote() for a in trainer.learners.actors])
    finally:
        trainer.close()
    for metrics in records:
        assert metrics["reward/nan_dropped"] == len(shards)  # one per shard
        # 2 prompts x 4 active steps x 3 branches, less 2 NaN-dropped: minibatches of 7, 7 and 8 rows, and a
        # minibatch of 7 gives the two ranks 4 and 3
        assert len(shards) == 2 and metrics["train/steps"] == 22
        assert metrics["train/first_ratio_max_dev"] == 0.0
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
