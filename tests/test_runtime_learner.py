"""The DeepSpeed learner: equal to the plain GRPOLearner in one process, data-parallel over two Ray actors
(ZeRO 0-3) with different data, and its checkpoint round trips."""

import math
import os

# set before ray.init, so the actors inherit them too
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from contextlib import contextmanager
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
from egrpo.models.families.flux import build_flux_pipeline
from egrpo.models.tiny import save_pipeline
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
        assert torch.equal(part0["loss_weight"], torch.full((2,), 0.5))


def test_slice_for_ranks_pads_uneven_minibatches(cfg):
    """7 rows over 3 ranks: slices of 3, 2, 2 real rows, each padded to 3; 2 rows over 3 ranks: one rank has
    padding only. Real rows weigh world_size / n, padding 0, so the ranks' weighted sums average to the mean."""
    steps = fake_steps(load_policy(cfg).latent_shape, 9, seed=3)
    minibatches = [steps.select(list(range(7))), steps.select([7, 8])]
    sliced = slice_for_ranks(minibatches, 3)
    assert [[len(mb) for mb in rank] for rank in sliced] == [[3, 1]] * 3
    for k, mb in enumerate(minibatches):
        parts = [rank[k] for rank in sliced]
        real = [p.select(p["loss_weight"] > 0) for p in parts]
        assert torch.equal(torch.cat([r["x_in"] for r in real]), mb["x_in"])  # every real row once, in order
        weights = torch.cat([p["loss_weight"] for p in parts])
        assert weights.sum().item() == pytest.approx(3.0)  # averaged over 3 ranks: total weight 1
        assert torch.allclose(weights[weights > 0], torch.full((len(mb),), 3 / len(mb)))
    assert [rank[1]["loss_weight"].tolist() for rank in sliced].count([0.0]) == 1  # one rank: padding only


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
    linear = torch.nn.functional.linear
    if stage is None:
        got, metrics = plain_result(micro, initial, minibatches)
    else:
        learner = ds_learner(micro, initial, stage)
        try:
            metrics = learner.train_iteration(minibatches)
            got = learner.trainable_state_dict()
        finally:
            learner.close()
    # ZeRO 3 would swap torch.nn.functional.linear process-wide (memory_efficient_linear, off in our config)
    assert torch.nn.functional.linear is linear
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
        assert folder == tmp_path / "iter_000004" and (tmp_path / "latest").read_text() == "iter_000004"
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


def test_bf16_needs_a_bfloat16_policy(cfg):
    with pytest.raises(ValueError, match="bf16 needs a policy loaded in bfloat16"):
        DeepSpeedLearner(load_policy(cfg), cfg.train, "mean", LearnerSettings(bf16=True))
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(("finetune", "stage"), [("lora", 0), ("lora", 2), ("full", 1), ("full", 3)])
def test_bf16_learner_computes_the_rollout_policy(cfg, finetune, stage):
    """The bf16 DeepSpeed path, forced on CPU (it trains there, slowly): a bf16 model whose LoRA masters stay fp32
    (DeepSpeed would cast them to bf16) or whose full weights train under DeepSpeed bf16 with fp32 gradient
    accumulation. A rollout worker's policy loaded the same way gives the learner's log-probs, before
    the step and after it has received the learner's weights."""
    cfg = replace(cfg, model=replace(cfg.model, dtype="bfloat16", finetune=finetune),
                  train=replace(cfg.train, micro_batch_size=2, kl_beta=0.0))
    rollout, learner_policy = load_policy(cfg), load_policy(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # a trained-looking state: LoRA's B is no longer zero, so its dtype matters
        state = {k: v + 0.05 * torch.randn_like(v.float()).to(v.dtype) for k, v in rollout.trainable_state_dict().items()}
    rollout.load_trainable_state_dict(state)
    learner_policy.load_trainable_state_dict(state)
    minibatches = fake_steps(rollout.latent_shape, 8, seed=2).chunks(4)
    # exact: ZeRO 3 re-gathers the same bf16 weights and, with memory_efficient_linear off, computes linear
    # layers with torch's own kernel (its replacement added the bias after rounding: a 4.2e-3 gap here)
    tolerance = 0.0

    def logp_gap(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> float:
        return max((x - y).abs().max().item() for xs, ys in zip(a, b, strict=True)
                   for x, y in zip(xs, ys, strict=True))
    learner = DeepSpeedLearner(learner_policy, cfg.train, "mean",
                               LearnerSettings(zero_stage=stage, bf16=True, master_port=free_port()))
    try:
        trainable_dtypes = {p.dtype for p in learner_policy.trainable_parameters()}
        assert trainable_dtypes == {torch.float32 if finetune == "lora" else torch.bfloat16}
        with learner._through_engine():
            before = learner.old_logprobs(minibatches)
        expected = GRPOLearner(rollout, cfg.train).old_logprobs(minibatches)
        assert logp_gap(before, expected) <= tolerance
        metrics = learner.train_iteration(minibatches)
        trained = learner.trainable_state_dict()
        with learner._through_engine():
            after = learner.old_logprobs(minibatches)
    finally:
        learner.close()
    assert max_diff(trained, state) > 1e-3 and math.isfinite(metrics["train/grad_norm"])
    assert metrics["train/first_ratio_max_dev"] == 0.0
    rollout.load_trainable_state_dict(trained)  # what the weight sync hands the rollout workers
    expected = GRPOLearner(rollout, cfg.train).old_logprobs(minibatches)
    assert logp_gap(after, expected) <= tolerance


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, num_gpus=0, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@contextmanager
def learner_actors(cfg: Config, count: int = 2, runtime_env: dict | None = None):
    """`count` LearnerActors (half a CPU each, so several pairs fit the module's Ray), closed and killed after."""
    handles = [LearnerActor.options(num_cpus=0.5, runtime_env=runtime_env).remote(cfg, 1) for _ in range(count)]
    try:
        yield handles
    finally:
        for handle in handles:
            try:
                ray.get(handle.close.remote(), timeout=TIMEOUT)  # destroy the group before the kill
            finally:
                ray.kill(handle)


@pytest.fixture(scope="module")
def actors(cfg: Config, local_ray):
    with learner_actors(cfg) as handles:
        yield handles


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
            assert paths == [str(tmp_path / "iter_000001")] * 2
            assert len(list((tmp_path / "iter_000001" / "optimizer").rglob("*optim_states.pt"))) == 2
            ray.get([a.train.remote(s) for a, s in zip(actors, slices, strict=True)], timeout=TIMEOUT)
            ray.get([a.load_checkpoint.remote(tmp_path) for a in actors], timeout=TIMEOUT)
            loaded = ray.get([a.trainable_state_dict.remote() for a in actors], timeout=TIMEOUT)
            assert max_diff(loaded[0], states[0]) == 0.0 and max_diff(loaded[1], states[0]) == 0.0
            saved = load_file(str(tmp_path / "iter_000001" / "trainable.safetensors"))
            assert max_diff(saved, states[0]) == 0.0
    finally:
        ray.get([a.close.remote() for a in actors], timeout=TIMEOUT)


@pytest.mark.parametrize(("finetune", "stages"), [("lora", (0, 1, 2, 3)), ("full", (2, 3))])
def test_uneven_rows_over_two_ranks(cfg, local_ray, finetune, stages):
    """Minibatches of 7 and 3 rows (as NaN drops and AEGPO's budgets leave them) over 2 ranks at micro-batch 1:
    the ranks' slices differ by a row, so without padding they run unequal numbers of forward/backward passes
    (gloo's "Received data size doesn't match" under ZeRO 3, a hang in other splits). Padded, every rank runs
    4 + 2 passes and the step is the plain learner's on the whole minibatches."""
    cfg = replace(cfg, model=replace(cfg.model, finetune=finetune), train=replace(cfg.train, micro_batch_size=1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        policy = load_policy(cfg)
    initial = policy.trainable_state_dict()
    steps = fake_steps(policy.latent_shape, 10, seed=5)
    minibatches = [steps.select(list(range(7))), steps.select([7, 8, 9])]
    expected, plain_metrics = plain_result(cfg, initial, minibatches)
    slices = slice_for_ranks(minibatches, 2)
    with learner_actors(cfg) as pair:
        for stage in stages:
            connect_learners(pair, LearnerSettings(zero_stage=stage), timeout_s=TIMEOUT)
            try:
                ray.get([a.load_trainable_state_dict.remote(initial) for a in pair], timeout=TIMEOUT)
                metrics = ray.get([a.train.remote(s) for a, s in zip(pair, slices, strict=True)], timeout=TIMEOUT)
                states = ray.get([a.trainable_state_dict.remote() for a in pair], timeout=TIMEOUT)
            finally:
                ray.get([a.close.remote() for a in pair], timeout=TIMEOUT)
            assert max_diff(states[0], states[1]) == 0.0
            assert max_diff(states[0], initial) > 1e-3
            assert max_diff(states[0], expected) <= ATOL_CLIP, f"ZeRO {stage}"
            # weighted statistics: the mean over ranks is the whole minibatch's
            loss = sum(m["train/policy_loss"] for m in metrics) / 2
            assert loss == pytest.approx(plain_metrics["train/policy_loss"], rel=1e-4, abs=1e-7)
            assert all(m["train/first_ratio_max_dev"] == 0.0 for m in metrics)


def test_learner_picks_its_accelerator_from_its_own_device(cfg, local_ray):
    """A driver on a GPU-less head node used to set DS_ACCELERATOR=cpu for the whole job, so GPU learners got
    DeepSpeed's CPU accelerator. Each learner now decides from its own device: here the inherited environment
    says cuda and the CPU learner still resolves cpu."""
    from egrpo.runtime.driver import ACTOR_ENV

    assert "DS_ACCELERATOR" not in ACTOR_ENV
    with learner_actors(cfg, count=1, runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda"}}) as (actor,):
        connect_learners([actor], LearnerSettings(), timeout_s=TIMEOUT)
        assert ray.get(actor.accelerator.remote(), timeout=TIMEOUT) == "cpu"


def test_zero3_broadcast_gathers_one_bucket_onto_rank_0_only(cfg, local_ray):
    """Under ZeRO 3 the full-weight broadcast used to gather every parameter on every learner rank (FLUX: +24 GB
    each). Now rank 0 receives the shards of one bucket at a time and the other ranks nothing: no parameter is
    ever un-partitioned, rank 0's buckets stay within the bucket size, and together they are exactly the weights
    that DeepSpeed's own gather gives."""
    cfg = replace(cfg, model=replace(cfg.model, finetune="full"), train=replace(cfg.train, kl_beta=0.0))
    bucket_bytes = 64 * 1024

    def _weight_buckets_probe(actor_self, bucket_bytes: int) -> dict:
        """Runs inside a LearnerActor (defined here, so Ray pickles it by value): iterate its broadcast buckets,
        noting at each what this rank holds."""
        learner = actor_self.learner
        params = learner.policy.trainable_parameters()
        seen = {"buckets": [], "gathered_params": 0}
        for tensors in learner.weight_buckets(bucket_bytes):
            seen["gathered_params"] = max(seen["gathered_params"], sum(p.numel() > 0 for p in params))
            seen["buckets"].append({"bytes": sum(t.numel() * t.element_size() for t in tensors),
                                    "tensors": [t.clone() for t in tensors]})
        return seen

    with learner_actors(cfg) as pair:
        connect_learners(pair, LearnerSettings(zero_stage=3), timeout_s=TIMEOUT)
        try:
            seen = ray.get([a.__ray_call__.remote(_weight_buckets_probe, bucket_bytes) for a in pair],
                           timeout=TIMEOUT)
            gathered = ray.get([a.trainable_state_dict.remote() for a in pair], timeout=TIMEOUT)[0]
            names = ray.get(pair[0].__ray_call__.remote(
                lambda self: sorted(self.learner.policy.named_trainable_parameters())), timeout=TIMEOUT)
        finally:
            ray.get([a.close.remote() for a in pair], timeout=TIMEOUT)
    rank0, rank1 = seen
    assert rank0["gathered_params"] == rank1["gathered_params"] == 0  # shards only, on both ranks, throughout
    assert len(rank0["buckets"]) == len(rank1["buckets"]) > 1  # the same collective calls on both ranks
    assert all(b["tensors"] == [] for b in rank1["buckets"])
    largest = max(v.numel() * v.element_size() for v in gathered.values())
    assert all(b["bytes"] <= max(bucket_bytes, largest) for b in rank0["buckets"])
    received = [t for b in rank0["buckets"] for t in b["tensors"]]
    assert len(received) == len(names) == len(gathered)
    assert all(torch.equal(t, gathered[n]) for n, t in zip(names, received, strict=True))
