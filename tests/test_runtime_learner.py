"""The DeepSpeed learner: equal to the plain GRPOLearner in one process, data-parallel over two Ray actors
(ZeRO 0-3) with different data, and its checkpoint round trips."""

import os

# set before ray.init, so the actors inherit them too
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from egrpo.batch import Batch
from egrpo.checkpoint import save_checkpoint, save_torch_optimizer
from egrpo.config import Config, from_dict
from egrpo.learner import GRPOLearner
from egrpo.models.tiny import build_flux_pipeline, save_pipeline
from egrpo.runtime.learner import (
    DeepSpeedLearner,
    LearnerActor,
    LearnerSettings,
    connect_learners,
    free_port,
    slice_for_ranks,
)
from egrpo.trainer import load_policy

WORDS = ["red", "blue", "circle", "square"]
PROMPTS = ["a red circle", "a blue square", "red", "blue circle"]
TIMEOUT = 120
# Tolerances on the trainable weights after 4 AdamW steps of lr 1e-2 (each weight moves by ~4e-2). Measured:
# one rank without gradient clipping is bit-identical to GRPOLearner (0.0) for ZeRO 0 and 2. With clipping
# active the clip factor is rounded differently (DeepSpeed computes the norm and scales the gradients itself):
# max |diff| 1.5e-8 to 7e-6 over LoRA initialisations, since Adam normalises away the gradient scale but not
# the rounding of near-zero gradient entries. Two ranks (averaged half-batch means vs the full-batch mean):
# 2.8e-7 here (ZeRO 0-3), up to 7.4e-6 with other initialisations; ATOL_CLIP as well.
ATOL_CLIP = 2e-5


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    folder = tmp_path_factory.mktemp("tiny_flux")
    save_pipeline(build_flux_pipeline(vae=False, pixel_unshuffle=2, words=WORDS), folder, height=16, width=16,
                  pixel_unshuffle=2, max_sequence_length=8)
    return from_dict({
        "run": {"device": "cpu"},
        "model": {"path": str(folder), "finetune": "lora", "lora_rank": 4},
        # a wide clip range and a low clipping norm: every step moves the weights, and clipping is active
        "train": {"lr": 1e-2, "clip_range": 10.0, "max_grad_norm": 0.005, "epochs": 2, "kl_beta": 0.1},
    })


@pytest.fixture(scope="module")
def initial(cfg: Config) -> dict[str, torch.Tensor]:
    """One LoRA initialisation (A random, B zero) that every learner starts from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_policy(cfg).trainable_state_dict()


def fake_steps(latent_shape: tuple[int, ...], n: int, seed: int) -> Batch:
    """Trained SDE steps with every column the learner reads."""
    gen = torch.Generator().manual_seed(seed)
    return Batch(
        {"x_in": torch.randn(n, *latent_shape, generator=gen), "x_out": torch.randn(n, *latent_shape, generator=gen),
         "sigma": torch.full((n,), 0.8), "sigma_next": torch.full((n,), 0.7), "g": torch.full((n,), 0.5),
         "logp_old": torch.zeros(n), "advantage": torch.randn(n, generator=gen)},
        {"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n)]},
    )


@pytest.fixture(scope="module")
def minibatches(cfg: Config) -> list[Batch]:
    """Two minibatches of 4 steps: each rank of two gets 2 rows of each."""
    return fake_steps(load_policy(cfg).latent_shape, 8, seed=1).chunks(4)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def plain_result(cfg: Config, initial, minibatches) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    policy = load_policy(cfg)
    policy.load_trainable_state_dict(initial)
    metrics = GRPOLearner(policy, cfg.train).train_iteration(minibatches)
    return policy.trainable_state_dict(), metrics


def ds_learner(cfg: Config, initial, stage: int) -> DeepSpeedLearner:
    policy = load_policy(cfg)
    policy.load_trainable_state_dict(initial)
    return DeepSpeedLearner(policy, cfg.train, "mean", LearnerSettings(zero_stage=stage, master_port=free_port()))


def test_slice_for_ranks(minibatches):
    sliced = slice_for_ranks(minibatches, 2)
    assert [len(s) for s in sliced] == [2, 2] and all(len(mb) == 2 for s in sliced for mb in s)
    for mb, part0, part1 in zip(minibatches, sliced[0], sliced[1], strict=True):
        assert torch.equal(torch.cat([part0["x_in"], part1["x_in"]]), mb["x_in"])
        assert part0["prompt"] + part1["prompt"] == mb["prompt"]
    with pytest.raises(ValueError, match="fewer than"):
        slice_for_ranks(minibatches, 5)


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("stage", [0, 2])
def test_single_rank_equals_plain_learner(cfg, initial, minibatches, stage, clip):
    if not clip:
        cfg = replace(cfg, train=replace(cfg.train, max_grad_norm=0.0))
    expected, plain_metrics = plain_result(cfg, initial, minibatches)
    learner = ds_learner(cfg, initial, stage)
    try:
        metrics = learner.train_iteration(minibatches)
        got = learner.trainable_state_dict()
    finally:
        learner.close()
    assert not torch.distributed.is_initialized()
    assert max_diff(got, initial) > 1e-3  # it trained
    assert max_diff(got, expected) <= (ATOL_CLIP if clip else 0.0)
    assert metrics["train/first_ratio_max_dev"] == 0.0
    assert metrics["train/updates"] == plain_metrics["train/updates"] == 4
    assert isinstance(metrics["train/grad_norm"], float)
    assert metrics["train/grad_norm"] == pytest.approx(plain_metrics["train/grad_norm"], rel=1e-5)
    if clip:
        assert metrics["train/grad_norm"] > cfg.train.max_grad_norm  # so clipping was exercised


@pytest.mark.parametrize("stage", [None, 0, 2, 3])  # None: the plain GRPOLearner
def test_micro_batches_accumulate_to_the_minibatch_step(cfg, initial, minibatches, stage):
    """train.micro_batch_size=1: four forward/backward passes per minibatch of 4, one optimiser step."""
    expected, plain_metrics = plain_result(cfg, initial, minibatches)
    micro = replace(cfg, train=replace(cfg.train, micro_batch_size=1))
    if stage is None:
        got, metrics = plain_result(micro, initial, minibatches)
    else:
        learner = ds_learner(micro, initial, stage)
        try:
            metrics = learner.train_iteration(minibatches)
            got = learner.trainable_state_dict()
        finally:
            learner.close()
    assert max_diff(got, initial) > 1e-3
    assert max_diff(got, expected) <= ATOL_CLIP
    assert metrics["train/first_ratio_max_dev"] == 0.0  # old log-probs came from the same micro-batches
    assert metrics["train/updates"] == plain_metrics["train/updates"] == 4
    assert metrics["train/grad_norm"] == pytest.approx(plain_metrics["train/grad_norm"], rel=1e-4)
    assert metrics["train/policy_loss"] == pytest.approx(plain_metrics["train/policy_loss"], rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("stage", [0, 2])
def test_save_load_round_trip(cfg, initial, minibatches, stage, tmp_path: Path):
    learner = ds_learner(cfg, initial, stage)
    try:
        learner.train_iteration(minibatches)
        saved = learner.trainable_state_dict()
        learner.save_state(tmp_path)
        learner.train_iteration(minibatches)
        after = learner.trainable_state_dict()
        assert max_diff(after, saved) > 1e-3
        learner.load_state(tmp_path)
        assert max_diff(learner.trainable_state_dict(), saved) == 0.0
        learner.train_iteration(minibatches)  # the restored Adam moments give the same step again
        assert max_diff(learner.trainable_state_dict(), after) == 0.0
    finally:
        learner.close()
    assert not any(".pt" in p.name and "model" in p.name and p.stat().st_size > 10**6
                   for p in tmp_path.rglob("*"))  # frozen weights are not saved


def test_egrpo_checkpoint_round_trip(cfg, initial, minibatches, tmp_path: Path):
    """save_checkpoint writes the egrpo layout with DeepSpeed's files in optimizer/; load_checkpoint resumes."""
    learner = ds_learner(cfg, initial, 0)
    try:
        learner.train_iteration(minibatches)
        saved = learner.trainable_state_dict()
        folder = learner.save_checkpoint(tmp_path, 3, {"note": "x"})
        assert folder == tmp_path / "iter_000003" and (tmp_path / "latest").read_text() == "iter_000003"
        assert (folder / "trainable.safetensors").is_file() and (folder / "weights").is_dir()
        assert (folder / "optimizer" / "deepspeed").is_dir()
        learner.train_iteration(minibatches)
        after = learner.trainable_state_dict()
        state = learner.load_checkpoint(tmp_path)  # through the `latest` marker
        assert state["iteration"] == 3 and state["note"] == "x" and state["path"] == str(folder)
        assert max_diff(learner.trainable_state_dict(), saved) == 0.0
        learner.train_iteration(minibatches)
        assert max_diff(learner.trainable_state_dict(), after) == 0.0
    finally:
        learner.close()


def test_resume_from_an_in_process_checkpoint(cfg, initial, minibatches, tmp_path: Path):
    """A checkpoint of the in-process loop (torch optimizer.pt) resumes under ZeRO 0 with its Adam state."""
    cfg = replace(cfg, train=replace(cfg.train, max_grad_norm=0.0))
    policy = load_policy(cfg)
    policy.load_trainable_state_dict(initial)
    plain = GRPOLearner(policy, cfg.train)
    plain.train_iteration(minibatches)
    save_checkpoint(tmp_path, 0, policy, {}, save_torch_optimizer(plain.optimizer))
    plain.train_iteration(minibatches)
    learner = ds_learner(cfg, {k: torch.zeros_like(v) for k, v in initial.items()}, 0)
    try:
        learner.load_checkpoint(tmp_path)
        learner.train_iteration(minibatches)
        assert max_diff(learner.trainable_state_dict(), policy.trainable_state_dict()) == 0.0
    finally:
        learner.close()


def test_bf16_needs_cuda(cfg):
    with pytest.raises(ValueError, match="bf16 needs a CUDA policy"):
        DeepSpeedLearner(load_policy(cfg), cfg.train, "mean", LearnerSettings(bf16=True))
    assert not torch.distributed.is_initialized()


@pytest.fixture(scope="module")
def actors(cfg: Config):
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, num_gpus=0, log_to_driver=False)
    handles = [LearnerActor.options(num_cpus=1).remote(cfg, 1) for _ in range(2)]
    try:
        yield handles
    finally:
        for handle in handles:
            try:
                ray.get(handle.close.remote(), timeout=TIMEOUT)  # destroy the group before the kill
            finally:
                ray.kill(handle)
        if started:
            ray.shutdown()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_actors_match_full_batch(cfg, initial, minibatches, actors, stage, tmp_path: Path):
    """Different halves on two ranks == one plain learner on the full minibatches; weights stay in sync."""
    connect_learners(actors, LearnerSettings(zero_stage=stage), timeout_s=TIMEOUT)
    try:
        assert len(set(ray.get([a.node_id.remote() for a in actors], timeout=TIMEOUT))) == 1
        ray.get([a.load_trainable_state_dict.remote(initial) for a in actors], timeout=TIMEOUT)
        slices = slice_for_ranks(minibatches, 2)
        metrics = ray.get([a.train.remote(s) for a, s in zip(actors, slices, strict=True)], timeout=TIMEOUT)
        states = ray.get([a.trainable_state_dict.remote() for a in actors], timeout=TIMEOUT)
        assert max_diff(states[0], states[1]) == 0.0
        assert max_diff(states[0], initial) > 1e-3
        expected, plain_metrics = plain_result(cfg, initial, minibatches)
        assert max_diff(states[0], expected) <= ATOL_CLIP
        print(f"two ranks, ZeRO {stage}: max |diff| to the full-batch learner {max_diff(states[0], expected):.2e}")
        for m in metrics:  # the norm of the averaged gradient is global; the ratios are each rank's own
            assert m["train/grad_norm"] == pytest.approx(plain_metrics["train/grad_norm"], rel=1e-4)
            assert m["train/first_ratio_max_dev"] == 0.0
        if stage >= 2:  # sharded optimiser state: every rank writes and reads its own shard
            paths = ray.get([a.save_checkpoint.remote(tmp_path, 0, {}) for a in actors], timeout=TIMEOUT)
            assert paths == [str(tmp_path / "iter_000000")] * 2
            assert len(list((tmp_path / "iter_000000" / "optimizer").rglob("*optim_states.pt"))) == 2
            ray.get([a.train.remote(s) for a, s in zip(actors, slices, strict=True)], timeout=TIMEOUT)
            ray.get([a.load_checkpoint.remote(tmp_path) for a in actors], timeout=TIMEOUT)
            loaded = ray.get([a.trainable_state_dict.remote() for a in actors], timeout=TIMEOUT)
            assert max_diff(loaded[0], states[0]) == 0.0 and max_diff(loaded[1], states[0]) == 0.0
            saved = load_file(str(tmp_path / "iter_000000" / "trainable.safetensors"))
            assert max_diff(saved, states[0]) == 0.0
    finally:
        ray.get([a.close.remote() for a in actors], timeout=TIMEOUT)
