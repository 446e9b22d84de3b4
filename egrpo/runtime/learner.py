"""The data-parallel learner: `GRPOLearner` inside a DeepSpeed engine, as a plain object and as a Ray actor.

This is the only module of egrpo that imports deepspeed (lazily, so that importing it to get `LearnerActor` or
`slice_for_ranks` costs nothing).

`DeepSpeedLearner` computes exactly what `GRPOLearner` computes (it overrides `backward` and `step` and nothing of
the algorithm); DeepSpeed averages the gradients of the ranks and, for ZeRO 1/2/3, shards the optimiser
state (and gradients, and weights). Each rank gets an equally long, weighted slice of every minibatch
(`slice_for_ranks`), so the averaged gradient is the full minibatch's mean gradient and all ranks take the same
number of steps and of forward/backward passes.

The policy's forward pass (`policy.velocity`) calls `policy.transformer(...)`. DeepSpeed 0.19 runs its
backward prologue (ZeRO's backward bookkeeping) from hooks that only `engine.forward` puts on the outputs, so
while training, `policy.transformer` is swapped for `_EngineCall`: calling it runs `engine(...)`, every
attribute (`.config`, `disable_adapters`, ...) is the transformer's. (The engine itself will not do: its
`.config` is DeepSpeed's config dict.) It is restored afterwards; everything else (state dicts, saving LoRA
weights) sees the plain transformer. Calling the raw transformer also kept the ranks in sync in a test with
DeepSpeed 0.19.8 (fp32, ZeRO 0-3), but it skips that prologue, so nothing here relies on it.

Ray: `__init__` cannot join the group, because the rendezvous address lives on the rank-0 actor, which does
not exist before the actors are created. So ranks meet in two phases (`connect_learners` / `start_learners`):

1. create the actors (each loads its policy in `__init__`, in parallel) and ask the rank-0 actor for
   `address()`: its node IP (`ray.util.get_node_ip_address()`) and a port free there (`free_port()`);
2. call `setup(settings)` on every actor *at once* (a collective: `init_process_group` waits for all ranks),
   each with its own `rank` and that address as master_addr / master_port.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import ray
import torch

from egrpo.batch import Batch
from egrpo.checkpoint import (
    load_torch_optimizer,
    publish_checkpoint,
    resolve_checkpoint,
    staging_dir,
    start_checkpoint,
)
from egrpo.config import Config, TrainConfig
from egrpo.learner import GRPOLearner
from egrpo.runtime.weight_sync import Checksum, GroupAddress, broadcast_bucket, buckets, host_store, join

log = logging.getLogger("egrpo")

CHECKPOINT_TAG = "deepspeed"  # the sub-folder DeepSpeed writes its files into, inside save_state's folder


@dataclass(frozen=True)
class LearnerSettings:
    """How one rank joins the data-parallel group. The driver builds one per rank (`dataclasses.replace`)."""

    zero_stage: int = 0  # 0: plain data parallel; 1: optimiser state sharded; 2: + gradients; 3: + weights
    bf16: bool = False  # the policy is bfloat16: full weights train under DeepSpeed bf16 (fp32 masters), LoRA in fp32
    world_size: int = 1
    rank: int = 0
    master_addr: str = "127.0.0.1"  # the rank-0 process's node IP
    master_port: int = 29500  # a free port on that node (`free_port()` there)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, else gloo
    local_rank: int = 0  # device index on this node; 0 under Ray, which gives each actor its own GPU
    timeout_s: float = 600.0  # collective / rendezvous timeout

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")


def free_port() -> int:
    """A TCP port that is free on this machine now (bound to 127.0.0.1:0 and released). Another process may
    take it before the process group binds it; that race is accepted (the group init then fails loudly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def slice_for_ranks(minibatches: list[Batch], world_size: int) -> list[list[Batch]]:
    """Per rank, its contiguous slice of every minibatch, padded so that every rank holds the same number of rows.

    Every rank takes one optimiser step per minibatch, and, because its slices are as long as every other
    rank's, as many forward/backward passes per step (ZeRO 3 makes each of them a collective: unequal counts
    hang or crash). A minibatch of n rows gives rank r the rows `mb.split(world_size)[r]`, each with
    `loss_weight` world_size / n, then copies of the minibatch's first row with weight 0 up to ceil(n /
    world_size) rows. DeepSpeed averages the ranks' gradients, so the step is that of the exact mean over the n
    real rows (ALGORITHMS.md section 2), however n divides, even when n < world_size."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    per_rank: list[list[Batch]] = [[] for _ in range(world_size)]
    for mb in minibatches:
        rows = len(mb)
        width = math.ceil(rows / world_size)
        weighted = Batch({**mb.tensors, "loss_weight": torch.full((rows,), world_size / rows)}, mb.meta)
        padding = Batch({**mb.tensors, "loss_weight": torch.zeros(rows)}, mb.meta).select([0])
        for rank, part in enumerate(weighted.split(world_size)):
            per_rank[rank].append(Batch.concat([part] + [padding] * (width - len(part))))
    return per_rank


def attach_latents(minibatches: list[Batch], latents: list[Any]) -> list[Batch]:
    """This rank's slices with their `x_in` / `x_out` filled in from the rollout shards' latents (object
    references, `RolloutWorker.rollout`'s third return), fetched one shard at a time: each row names its
    `shard` and its `row` there. Only the rows this rank trains on stay in memory; the driver never held them."""
    columns: list[dict[str, torch.Tensor]] = [{} for _ in minibatches]
    for shard in sorted({int(s) for mb in minibatches for s in mb["shard"].tolist()}):
        fetched = ray.get(latents[shard])
        for mb, out in zip(minibatches, columns, strict=True):
            mine = (mb["shard"] == shard).nonzero().flatten()
            if not len(mine):
                continue
            rows = mb["row"][mine]
            for name, tensor in fetched.tensors.items():
                if name not in out:
                    out[name] = torch.empty((len(mb), *tensor.shape[1:]), dtype=tensor.dtype)
                out[name][mine] = tensor[rows]
        del fetched
    return [Batch({**mb.tensors, **out}, mb.meta) for mb, out in zip(minibatches, columns, strict=True)]


def _import_deepspeed(device: torch.device):
    """Import deepspeed for `device`'s accelerator, without the 35 s JIT build of its CPU shm comm op (used
    only by inference all-reduce). The learner's own device decides, whatever DS_ACCELERATOR the process
    inherited: a driver on a GPU-less head node must not hand its GPU learners the CPU accelerator."""
    os.environ["DS_ACCELERATOR"] = "cuda" if device.type == "cuda" else "cpu"
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class _EngineCall:
    """Stands in for the transformer during training: calls go through `engine.forward`, attributes are the
    transformer's."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._engine.module, name)


class DeepSpeedLearner(GRPOLearner):
    """`GRPOLearner` whose updates go through a DeepSpeed engine (see the module docstring).

    Construction joins the process group, so with world_size > 1 every rank must construct its learner at
    the same time. `GRPOLearner.__init__` builds the torch AdamW; it is handed to DeepSpeed as its client
    optimiser (no JIT-compiled fused Adam), and afterwards `self.optimizer` is DeepSpeed's wrapper of it
    (the ZeRO optimiser for stages >= 1), so exactly one optimiser steps.
    """

    def __init__(self, policy, train_cfg: TrainConfig, reduction: Literal["mean", "sum"] = "mean",
                 settings: LearnerSettings | None = None) -> None:
        settings = settings or LearnerSettings()
        device = torch.device(policy.device)
        if settings.bf16 and policy.dtype != torch.bfloat16:
            raise ValueError(f"bf16 needs a policy loaded in bfloat16 (model.dtype: bfloat16), got {policy.dtype}")
        # DeepSpeed's bf16 mode casts every trainable weight to bf16. Full weights are bf16 anyway (it keeps fp32
        # masters in the optimiser and, with grad_accum_dtype fp32, accumulates gradients in fp32); LoRA masters
        # are fp32 on the rollout workers too, so DeepSpeed runs them in fp32 on the frozen bf16 base and both
        # sides compute the same policy.
        self.mixed_precision = settings.bf16 and any(p.dtype == torch.bfloat16 for p in policy.trainable_parameters())
        if self.mixed_precision and settings.zero_stage == 0:
            raise ValueError("bf16 full fine-tuning needs ZeRO stage >= 1 (DeepSpeed accumulates bf16 gradients "
                             "in fp32 only under ZeRO)")
        super().__init__(policy, train_cfg, reduction)
        self.settings = settings
        deepspeed = _import_deepspeed(device)
        self._deepspeed = deepspeed
        backend = settings.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        os.environ.update(RANK=str(settings.rank), WORLD_SIZE=str(settings.world_size),
                          LOCAL_RANK=str(settings.local_rank), MASTER_ADDR=settings.master_addr,
                          MASTER_PORT=str(settings.master_port))
        if torch.distributed.is_initialized():
            raise RuntimeError("torch.distributed is already initialised in this process; close() the "
                               "previous learner first")
        if device.type == "cuda":  # DeepSpeed moves the model to cuda:local_rank; NCCL needs the device set
            if (device.index or 0) != settings.local_rank:
                raise ValueError(f"the policy is on {device}, but local_rank is {settings.local_rank}")
            torch.cuda.set_device(settings.local_rank)
        torch.distributed.init_process_group(backend, rank=settings.rank, world_size=settings.world_size,
                                             timeout=timedelta(seconds=settings.timeout_s))
        config = {
            # we drive accumulation ourselves: backward per micro-batch, the boundary set explicitly
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": float(train_cfg.max_grad_norm),
            # ZeRO 3 would swap torch.nn.functional.linear for its own, which adds the bias after rounding the
            # product (bf16: a 4e-3 log-prob gap to the rollout workers, who use torch's fused linear)
            "zero_optimization": {"stage": settings.zero_stage, "memory_efficient_linear": False},
            "bf16": {"enabled": self.mixed_precision},
            "data_types": {"grad_accum_dtype": "fp32" if self.mixed_precision else None},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=policy.transformer, optimizer=self.optimizer, config=config,
                dist_init_required=False,
            )
        except BaseException:
            self.close()
            raise
        self.module = self.engine.module  # the very transformer object (DeepSpeed does not copy it)

    @contextmanager
    def _through_engine(self) -> Iterator[None]:
        """Route `policy.velocity`'s transformer calls through `engine.forward` (module docstring)."""
        transformer = self.policy.transformer
        self.policy.transformer = _EngineCall(self.engine)
        try:
            yield
        finally:
            self.policy.transformer = transformer

    def train_iteration(self, minibatches: list[Batch]) -> dict[str, float]:
        """`GRPOLearner.train_iteration` on this rank's slices (metrics are this rank's own)."""
        with self._through_engine():
            return super().train_iteration(minibatches)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """engine.backward; the gradients are all-reduced / reduce-scattered at the last micro-batch of a
        minibatch (the accumulation boundary, set explicitly because minibatches differ in micro-batches)."""
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        self.engine.backward(loss)

    def step(self) -> float:
        """engine.step (clips, steps, clears the gradients). Returns the global gradient norm before
        clipping, as `GRPOLearner` does."""
        norm = None
        if self.settings.zero_stage == 0 and not self.mixed_precision:
            # Plain data parallel: the averaged gradients are on the parameters now; DeepSpeed's own
            # clipping discards the norm it computes, so compute it here.
            grads = [p.grad.float() for p in self.policy.trainable_parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) \
                if grads else torch.zeros(())
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed reported no gradient norm")
        return float(norm)

    # ------------------------------------------------------------------------------------ state

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Under ZeRO 3, the full trainable weights on every rank inside the block (a collective; changes are
        discarded); otherwise nothing."""
        if self.settings.zero_stage == 3:
            with self._deepspeed.zero.GatheredParameters(self.policy.trainable_parameters()):
                yield
        else:
            yield

    def weight_buckets(self, bucket_bytes: int) -> Iterator[list[torch.Tensor]]:
        """The trained parameters in the full-weight broadcast's buckets (`weight_sync.buckets` over
        `policy.named_trainable_parameters()`, the cut every rollout worker computes from its own copy). Rank 0
        gets each bucket's full tensors; the other ranks get empty lists. Under ZeRO 3 it is a collective: each
        bucket's shards are gathered onto rank 0 alone (`torch.distributed.gather`), so rank 0 holds one bucket
        on top of its shard and the other ranks nothing, never the 12B-parameter model."""
        named = self.policy.named_trainable_parameters()
        zero3 = self.settings.zero_stage == 3
        specs = {n: (p.ds_numel, p.dtype) if zero3 else (p.numel(), p.dtype) for n, p in named.items()}
        rank0 = self.settings.rank == 0
        if not zero3 and not rank0:
            return
        for names in buckets(specs, bucket_bytes):
            params = [named[n] for n in names]
            if not zero3:
                yield [p.detach() for p in params]
                continue
            # rank r holds elements [r * s, (r + 1) * s) of each flattened parameter, s its padded partition
            local = torch.cat([p.ds_tensor.reshape(-1) for p in params])
            shards = [torch.empty_like(local) for _ in range(self.settings.world_size)] if rank0 else None
            torch.distributed.gather(local, shards, dst=0)
            if not rank0:
                yield []
                continue
            full, offset = [], 0
            for p in params:
                size = p.ds_tensor.numel()
                flat = torch.cat([shard[offset : offset + size] for shard in shards])
                full.append(flat[: p.ds_numel].view(p.ds_shape))
                offset += size
            yield full

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """`policy.trainable_state_dict()`; under ZeRO 3 the sharded trainable weights are gathered first,
        which is a collective (every rank must call it)."""
        with self.gathered():
            return self.policy.trainable_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """`policy.load_trainable_state_dict`, then the optimiser's fp32 master copy (ZeRO, bf16) is refreshed
        from the new weights so the next step starts from them. The Adam moments are kept. Under ZeRO 3 it is
        a collective (the weights are gathered, set, broadcast from rank 0 and re-partitioned)."""
        if self.settings.zero_stage == 3:
            with self._deepspeed.zero.GatheredParameters(self.policy.trainable_parameters(), modifier_rank=0):
                self.policy.load_trainable_state_dict(state)
        else:
            self.policy.load_trainable_state_dict(state)
        refresh = getattr(self.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    def save_state(self, folder: Path) -> None:
        """DeepSpeed's own checkpoint of the trainable weights and optimiser state (ZeRO: one shard per
        rank) under `folder/deepspeed/`. Collective: every rank calls it with the same folder, which must be
        on storage every rank writes to and (for load_state) reads from. Frozen weights are not saved."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, save_latest=False,
                                    exclude_frozen_parameters=True)

    def load_state(self, folder: Path) -> None:
        """Inverse of `save_state` (collective). DeepSpeed's loader calls torch.load(weights_only=False)
        internally (its ZeRO optimiser shards hold pickled Python objects and fail a weights_only load), so
        only load checkpoints you wrote yourself. DeepSpeed loads non-strictly only because the frozen
        weights are not in the file; a trainable weight missing from it is still an error here."""
        folder = Path(folder)
        if not (folder / CHECKPOINT_TAG).is_dir():
            raise FileNotFoundError(f"no DeepSpeed state at {folder / CHECKPOINT_TAG}")
        trainable = {name for name, p in self.module.named_parameters() if p.requires_grad}
        path, _ = self.engine.load_checkpoint(str(folder), tag=CHECKPOINT_TAG, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load its state from {folder}")
        saved = self._saved_parameter_names(folder)
        if saved is not None and not trainable <= saved:
            raise KeyError(f"trainable weights missing from {folder}: {sorted(trainable - saved)[:5]}")

    def save_checkpoint(self, root: Path, iteration: int, loop_state: dict[str, Any]) -> Path:
        """A whole egrpo checkpoint (`egrpo.checkpoint` layout) with DeepSpeed's state in `optimizer/`;
        collective. Rank 0 stages the weights and state.json, every rank writes its ZeRO shard into the same
        staging folder (so `root` must be storage that all ranks share), rank 0 publishes it (`publish_checkpoint`:
        the manifest of every rank's files, the rename, then the `latest` marker). Returns the published folder
        on every rank."""
        root = Path(root)
        with self.gathered():
            if self.settings.rank == 0:
                start_checkpoint(root, iteration, self.policy, loop_state)
        torch.distributed.barrier()  # the staging folder is fresh before any rank writes into it
        self.save_state(staging_dir(root, iteration) / "optimizer")
        torch.distributed.barrier()  # every shard is written before the rename
        final = [str(publish_checkpoint(root, iteration)) if self.settings.rank == 0 else ""]
        torch.distributed.broadcast_object_list(final, src=0)
        return Path(final[0])

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Resume from an egrpo checkpoint (a checkpoint folder, or a run / checkpoints folder with a `latest`
        marker); collective. Returns its loop state (state.json, plus `path`). A checkpoint of the in-process
        loop (a torch optimizer.pt, no DeepSpeed files) also loads: its weights always, and its AdamW state
        when this learner steps that very optimiser (ZeRO 0, fp32); otherwise Adam restarts from zero. It does
        not check the manifest: the driver verified the checkpoint once (`checkpoint_to_resume`) before any rank
        is asked to load it."""
        folder = resolve_checkpoint(path)
        if (folder / "optimizer" / CHECKPOINT_TAG).is_dir():
            self.load_state(folder / "optimizer")
        else:
            from safetensors.torch import load_file

            self.load_trainable_state_dict(load_file(str(folder / "trainable.safetensors")))
            torch_state = folder / "optimizer" / "optimizer.pt"
            if torch_state.is_file() and isinstance(self.optimizer, torch.optim.AdamW):
                load_torch_optimizer(self.optimizer, folder)
            else:
                log.warning("%s has no DeepSpeed state for ZeRO %d: loaded the weights, Adam restarts",
                            folder, self.settings.zero_stage)
        state = json.loads((folder / "state.json").read_text())
        state["path"] = str(folder)
        return state

    @staticmethod
    def _saved_parameter_names(folder: Path) -> set[str] | None:
        files = sorted((folder / CHECKPOINT_TAG).glob("*model_states.pt"))
        if not files:
            return None
        state = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)
        return set(state.get("module") or {})

    def close(self) -> None:
        """Leave and destroy the process group (do this before killing an actor)."""
        if torch.distributed.is_initialized():
            deepspeed = getattr(self, "_deepspeed", None)
            if deepspeed is not None and deepspeed.comm.is_initialized():
                deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups
            else:
                torch.distributed.destroy_process_group()


@ray.remote
class LearnerActor:
    """One data-parallel rank: a thin shell around `DeepSpeedLearner`.

    Two-phase start (module docstring; `connect_learners` does it): `__init__` loads the policy, `address()`
    on the rank-0 actor gives (node IP, free port), then `setup(settings)` runs on all actors concurrently,
    each with its rank and that address. `close()` leaves the group; `setup` may then be called again (with
    other settings, e.g. a new port) on freshly loaded weights. Metrics from `train` are the rank's own
    (the driver averages them); weights are identical on all ranks after every step.
    """

    def __init__(self, cfg: Config, cpus: float = 1.0) -> None:
        torch.set_num_threads(max(1, int(cpus)))  # cpus: the actor's CPU reservation
        self.cfg = cfg
        self.learner: DeepSpeedLearner | None = None
        self._policy = self._load_policy()  # loaded before the rendezvous, so ranks load in parallel

    def _load_policy(self):
        from egrpo.trainer import load_policy

        policy = load_policy(self.cfg, keep_reference=self.cfg.train.kl_beta > 0)  # AEGPO's E_ref: rollouts
        if not self.cfg.model.learner_text_encoders:  # prompts come with each train call instead
            policy.free_text_encoders()
        return policy

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def address(self) -> dict[str, Any]:
        """This actor's node IP and a port free on it: the rendezvous when this actor is rank 0, as
        LearnerSettings fields (`replace(settings, **address)`)."""
        return {"master_addr": ray.util.get_node_ip_address(), "master_port": free_port()}

    def setup(self, settings: LearnerSettings) -> None:
        """Join the group (collective) with the policy loaded in `__init__` (after a close(): a fresh load)."""
        if self.learner is not None:
            raise RuntimeError("setup was already called; close() first")
        policy, self._policy = self._policy or self._load_policy(), None
        self.learner = DeepSpeedLearner(policy, self.cfg.train, self.cfg.sampler.logprob_reduction, settings)

    def accelerator(self) -> str:
        """The accelerator DeepSpeed resolved in this process ("cuda", "cpu"): the learner's own device's."""
        return self._ready()._deepspeed.get_accelerator().device_name()

    def _ready(self) -> DeepSpeedLearner:
        if self.learner is None:
            raise RuntimeError("call setup(settings) first")
        return self.learner

    def train(self, minibatches: list[Batch], latents: list[Any] | None = None,
              embeddings: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, float]:
        """One iteration on this rank's slices (`slice_for_ranks`); collective. `latents`: the rollout shards'
        latent references, when the slices name their rows (`attach_latents`) instead of carrying them.
        `embeddings`: the prompts' conditioning, for a learner whose text encoders were freed
        (`model.learner_text_encoders: false`)."""
        learner = self._ready()
        if embeddings:
            learner.policy.add_embeddings(embeddings)
        if latents is not None:
            minibatches = attach_latents(minibatches, latents)
        return learner.train_iteration(minibatches)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self._ready().trainable_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set the weights; call it on every rank with the same state (collective under ZeRO 3)."""
        self._ready().load_trainable_state_dict(state)

    # full-weight broadcast to the rollout workers (egrpo.runtime.weight_sync); rank 0 is the sender

    def host_weight_store(self) -> tuple[str, int]:
        """Start the broadcast group's rendezvous store on this node; returns (host, port)."""
        host, port = ray.util.get_node_ip_address(), free_port()
        self._weight_store = host_store(host, port, self.cfg.runtime.timeout_s)
        return host, port

    def join_weight_group(self, address: GroupAddress) -> None:
        old = getattr(self, "_weight_group", None)
        self._weight_group = join(address, 0, self._weight_store)
        self._weight_device = torch.device("cuda" if address.backend == "nccl" else "cpu")
        if old is not None and address.backend == "nccl":  # free the previous generation's communicator
            old.abort()

    def publish_weights(self) -> Any:
        """This rank's part in publishing the new weights (`egrpo.runtime.weight_sync`); every rank is called.
        Object store (LoRA): rank 0 returns its trainable state dict, the others None (under ZeRO 3 they join
        its gather). Broadcast (full weights): rank 0 sends every bucket to the rollout workers' `receive_weights`
        as it is gathered, and returns the checksum of what it sent when `runtime.sync_check` asks (computed
        on the device); the other ranks join the ZeRO 3 gathers and return 0."""
        learner = self._ready()
        if not self.cfg.broadcast_weights:
            state = learner.trainable_state_dict()
            return state if learner.settings.rank == 0 else None
        checksum = Checksum()
        for tensors in learner.weight_buckets(int(self.cfg.runtime.sync_bucket_mb * 2**20)):
            if tensors:
                broadcast_bucket(self._weight_group, tensors, self._weight_device)
                if self.cfg.runtime.sync_check:
                    checksum.add(tensors)
        return checksum.total

    def save_state(self, folder: str | Path) -> None:
        self._ready().save_state(Path(folder))

    def load_state(self, folder: str | Path) -> None:
        self._ready().load_state(Path(folder))

    def save_checkpoint(self, root: str | Path, iteration: int, loop_state: dict[str, Any]) -> str:
        """`DeepSpeedLearner.save_checkpoint` (collective); returns the published folder."""
        return str(self._ready().save_checkpoint(Path(root), iteration, loop_state))

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """`DeepSpeedLearner.load_checkpoint` (collective); returns the checkpoint's loop state."""
        return self._ready().load_checkpoint(path)

    def close(self) -> None:
        if self.learner is not None:
            self.learner.close()
            self.learner = None


def connect_learners(actors: list[Any], settings: LearnerSettings | None = None,
                     timeout_s: float = 600.0) -> list[Any]:
    """Join `actors` (LearnerActor handles, rank order) into one group: phase 1 asks the rank-0 actor for its
    address, phase 2 runs every `setup` concurrently. `settings` gives zero_stage / bf16 / backend; rank,
    world_size and the address are filled in. Returns `actors`."""
    base = settings or LearnerSettings()
    address = ray.get(actors[0].address.remote(), timeout=timeout_s)
    ray.get([a.setup.remote(replace(base, world_size=len(actors), rank=r, **address))
             for r, a in enumerate(actors)], timeout=timeout_s)
    return actors


def start_learners(cfg: Config, world_size: int, settings: LearnerSettings | None = None,
                   actor_options: dict[str, Any] | None = None, timeout_s: float = 600.0) -> list[Any]:
    """Create `world_size` LearnerActors and `connect_learners` them; returns the handles in rank order.
    `actor_options` go to `LearnerActor.options` (e.g. num_cpus, num_gpus, scheduling_strategy)."""
    options = actor_options or {}
    actors = [LearnerActor.options(**options).remote(cfg, options.get("num_cpus", 1.0))
              for _ in range(world_size)]
    return connect_learners(actors, settings, timeout_s)
