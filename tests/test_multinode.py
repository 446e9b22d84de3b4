"""Several Ray nodes on this machine (ray.cluster_utils.Cluster): actors spread over nodes and learners on
different nodes train in sync."""

from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from egrpo.config import load_config
from egrpo.runtime.driver import RayTrainer

RECIPE = Path(__file__).parents[1] / "launch" / "configs" / "toy-egrpo.yaml"
ENV = {"HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
       "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture
def three_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=3)
    ray.init(address=cluster.address, runtime_env={"env_vars": ENV})
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_actors_spread_over_nodes_and_learners_stay_in_sync(tmp_path, three_nodes):
    cfg = load_config(RECIPE, [f"run.dir={tmp_path}", "run.wandb=disabled", "runtime.dashboard=false",
                               "runtime.placement=SPREAD", "runtime.learners=2", "runtime.zero_stage=1",
                               "runtime.rollout_workers=2", "plan.prompts_per_iteration=2", "plan.group_size=3",
                               "train.iterations=2", "train.eval_every=0", "train.eval_prompts=4",
                               "train.eval_seeds=1"])
    trainer = RayTrainer(cfg)
    try:
        learner_nodes = ray.get([a.node_id.remote() for a in trainer.learners.actors])
        assert len(set(learner_nodes)) == 2  # SPREAD put the two ranks on different nodes
        for iteration in range(2):
            metrics = trainer.iteration(iteration)
            assert metrics["samples/received"] == metrics["samples/requested"]
        states = ray.get([a.trainable_state_dict.remote() for a in trainer.learners.actors])
        assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in states[0].items() if "lora_B" in k)
        for key in states[0]:
            assert torch.equal(states[0][key], states[1][key])  # gradients were all-reduced across nodes
    finally:
        trainer.close()


def test_losing_the_node_of_the_rollout_workers_is_survived(tmp_path):
    # The head has no CPUs (only the driver and the scheduler). PACK fills one 2-CPU node with the rollout group
    # (2 x 1 CPU), so the learner and reward server sit on the other two. Losing the rollout node mid-run moves
    # the rollout workers to the room left there.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2) for _ in range(3)]
    ray.init(address=cluster.address, runtime_env={"env_vars": ENV})
    cluster.wait_for_nodes()
    cfg = load_config(RECIPE, [f"run.dir={tmp_path}", "run.wandb=disabled", "runtime.dashboard=false",
                               "plan.prompts_per_iteration=2", "plan.group_size=3", "train.iterations=2",
                               "train.eval_every=0", "train.eval_prompts=4", "train.eval_seeds=1",
                               "runtime.timeout_s=300"])
    trainer = RayTrainer(cfg)
    try:
        rollout_nodes = set(ray.get([w.node_id.remote() for w in trainer.rollout.actors]))
        victim = next(w for w in workers if w.node_id in rollout_nodes)
        assert rollout_nodes == {victim.node_id}
        trainer.iteration(0)
        cluster.remove_node(victim)
        metrics = trainer.iteration(1)
        assert metrics["samples/received"] == metrics["samples/requested"]
        assert victim.node_id not in set(ray.get([w.node_id.remote() for w in trainer.rollout.actors]))
    finally:
        trainer.close()
        ray.shutdown()
        cluster.shutdown()
