"""Weight sync: the learners' new weights reach the rollout workers, one object per mode.

- `ObjectStoreSync` (LoRA: small): learner rank 0's trainable state dict goes into the Ray object store, and
  every rollout call carries a reference to it; a worker loads it when the call's version is new to it (so a
  restarted worker catches up by itself).
- `BroadcastSync` (full weights; FLUX.1-dev: 12B parameters, which the object store would copy into and out of
  every node): learner rank 0 broadcasts the weights to every rollout worker over torch.distributed (NCCL on
  GPU, gloo on CPU), in a process group of its own: rank 0 is learner rank 0, ranks 1..N the rollout workers.
  It is not the learners' DeepSpeed world, and it is built without `init_process_group`, so a process may
  belong to both.
  - The members meet through a `TCPStore` hosted by learner rank 0 (`host_store`).
  - Tensors go in flat buckets of one dtype of at most `bucket_bytes` (`buckets`): few collective calls, and
    a bounded buffer on each side. Under ZeRO 3 learner rank 0 gathers the weights bucket by bucket onto
    itself alone (`DeepSpeedLearner.weight_buckets`), so no rank ever holds the whole model twice.
  - A process group with a dead member cannot be repaired. When a rollout worker restarts, it answers its
    next call with `StaleWeightsError`; every member then joins a new *generation* of the group, a fresh key
    prefix in the same store (`join`), and the weights are sent again.

Both objects own the weights' version (the number every rollout records, so staleness is visible), publish,
recovery and the checksum check (`runtime.sync_check`). The driver only calls them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist

log = logging.getLogger("egrpo.runtime")


class StaleWeightsError(RuntimeError):
    """A rollout was asked for weights this worker does not hold and that do not travel with the call (full
    weights come by broadcast): the worker restarted and missed them. The driver re-forms the broadcast
    group, sends the weights and resubmits the call."""


@dataclass(frozen=True)
class GroupAddress:
    host: str  # learner rank 0's node IP
    port: int  # its TCPStore port
    world_size: int  # 1 sender + the rollout workers
    generation: int  # bumped whenever the membership changes (a worker restarted)
    backend: str  # "gloo" or "nccl"
    timeout_s: float


def host_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store, on learner rank 0; it lives as long as that actor."""
    return dist.TCPStore(host, port, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def nccl_options(timeout_s: float):
    """NCCL group options whose collectives time out after `timeout_s` (runtime.timeout_s), as
    `init_process_group(timeout=...)` would set them; without it NCCL waits its own default (10 minutes)."""
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timedelta(seconds=timeout_s)
    return options


def join(address: GroupAddress, rank: int, store: dist.Store | None = None) -> dist.ProcessGroup:
    """This process's member of the group's current generation (rank 0 passes the store it hosts)."""
    timeout = timedelta(seconds=address.timeout_s)
    if store is None:
        store = dist.TCPStore(address.host, address.port, is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"egrpo-weights/{address.generation}", store)
    if address.backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, address.world_size, nccl_options(address.timeout_s))
    return dist.ProcessGroupGloo(prefixed, rank, address.world_size, timeout)


def buckets(specs: dict[str, tuple[int, torch.dtype]], bucket_bytes: int) -> list[list[str]]:
    """Names of `specs` (name -> (elements, dtype)) in sorted order, cut into runs of one dtype of at most
    `bucket_bytes` (a tensor larger than a bucket travels alone). Sender and receivers compute the same cut
    from the same names, sizes and dtypes (`tensor_specs`), whether or not the sender's weights are sharded."""
    cut: list[list[str]] = []
    size, dtype = 0, None
    for name in sorted(specs):
        numel, tensor_dtype = specs[name]
        nbytes = numel * tensor_dtype.itemsize
        if not cut or tensor_dtype != dtype or size + nbytes > bucket_bytes:
            cut.append([])
            size, dtype = 0, tensor_dtype
        cut[-1].append(name)
        size += nbytes
    return cut


def tensor_specs(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, torch.dtype]]:
    return {name: (tensor.numel(), tensor.dtype) for name, tensor in state.items()}


def broadcast_bucket(group: dist.ProcessGroup, tensors: list[torch.Tensor], device: torch.device) -> None:
    """One collective call: rank 0 sends `tensors` (one dtype) as a flat buffer staged on `device`; every other
    rank receives it and copies it into its own `tensors`, in place (live parameters update the model)."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    if group.rank() == 0:
        flat = torch.cat([t.reshape(-1).to(device) for t in tensors])
    else:
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=device)
    group.broadcast([flat], options).wait()
    if group.rank() == 0:
        return
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def broadcast_state(
    group: dist.ProcessGroup, state: dict[str, torch.Tensor], bucket_bytes: int, device: torch.device
) -> int:
    """Broadcast rank 0's `state` into every other rank's `state` (same names, shapes, dtypes), bucket by
    bucket. Returns the number of collective calls."""
    cut = buckets(tensor_specs(state), bucket_bytes)
    for names in cut:
        broadcast_bucket(group, [state[n] for n in names], device)
    return len(cut)


class Checksum:
    """An order-dependent float64 checksum, sum_i (i + 1) sum(t_i), of tensors added in sorted-name order.
    It is computed where the tensors are (on the GPU for GPU weights: nothing is copied to the host) and can
    be fed bucket by bucket, so sender and receivers compare the same number however the weights were cut."""

    def __init__(self) -> None:
        self.count, self.total = 0, 0.0

    def add(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self.count += 1
            self.total += float(tensor.detach().double().sum()) * self.count


def weights_checksum(state: dict[str, torch.Tensor]) -> float:
    """`Checksum` of a whole state dict."""
    checksum = Checksum()
    checksum.add(state[name] for name in sorted(state))
    return checksum.total


# --------------------------------------------------------------------------------------- the driver's side

Get = Callable[..., Any]  # the driver's ray.get with its timeout and error message


class ObjectStoreSync:
    """LoRA weights through the Ray object store (module docstring)."""

    def __init__(self, learners: list, rollout: list, get: Get, timeout_s: float) -> None:
        self.learners, self.rollout, self._get, self.timeout_s = learners, rollout, get, timeout_s
        self.version = 0
        self.weights = None  # reference to rank 0's state dict of `version`

    def publish(self, version: int) -> None:
        """Rank 0's trainable state dict into the object store as `version` (under ZeRO 3 gathering it is a
        collective, so every rank is asked and rank 0's answer kept; the driver never fetches it)."""
        refs = [a.publish_weights.remote() for a in self.learners]
        self._get(refs[1:], "weight publish")  # the other ranks return None once the gather is done
        ready, _ = ray.wait(refs[:1], timeout=self.timeout_s)  # ready, not fetched
        if not ready:  # a reference that never resolves would only hang the next rollouts
            raise TimeoutError(f"learner rank 0 did not publish weights version {version} within "
                               f"runtime.timeout_s = {self.timeout_s:g} s")
        self.weights, self.version = refs[0], version

    def call_args(self) -> tuple[list, int]:
        """What a rollout call carries: the weights' reference (in a list, so Ray does not fetch it) and version."""
        return [self.weights], self.version

    def recover(self) -> None:
        raise RuntimeError("object-store weights travel with every call; a worker cannot miss them")

    def check(self) -> float:
        """Load the current weights on every rollout worker now; the largest checksum difference to rank 0's."""
        sent = weights_checksum(self._get(self.weights))
        self._get([w.sync.remote([self.weights], self.version) for w in self.rollout])
        return max(abs(r - sent) for r in self._get([w.weights_checksum.remote() for w in self.rollout]))


class BroadcastSync:
    """Full weights by torch.distributed broadcast from learner rank 0 (module docstring)."""

    def __init__(self, learners: list, rollout: list, get: Get, backend: str, timeout_s: float) -> None:
        self.learners, self.rollout, self._get = learners, rollout, get
        self.backend, self.timeout_s = backend, timeout_s
        self.version = 0
        self.generation = -1  # of the broadcast group; -1: not formed yet
        self.store: tuple[str, int] | None = None
        self.sent_checksum = 0.0

    def publish(self, version: int) -> None:
        """Broadcast the weights as `version` to every rollout worker now (re-forming the group first when a
        worker restarted). Every learner rank takes part: under ZeRO 3 they gather each bucket onto rank 0."""
        generations = self._get([w.weight_group_generation.remote() for w in self.rollout])
        if self.generation < 0 or any(g != self.generation for g in generations):
            self._form_group()
        receive = [w.receive_weights.remote(version) for w in self.rollout]
        send = [a.publish_weights.remote() for a in self.learners]
        self.sent_checksum = self._get([*send, *receive], "weight broadcast")[0]
        self.version = version

    def call_args(self) -> tuple[list, int]:
        """No weights travel with a call: a worker that lacks `version` raises StaleWeightsError."""
        return [None], self.version

    def recover(self) -> None:
        """A rollout worker restarted and missed a broadcast: re-form the group and send the weights again."""
        self.publish(self.version)

    def check(self) -> float:
        """The largest difference between a worker's checksum of what it holds and what rank 0 sent (computed
        during the broadcast, with runtime.sync_check)."""
        received = self._get([w.weights_checksum.remote() for w in self.rollout])
        return max(abs(r - self.sent_checksum) for r in received)

    def _form_group(self) -> None:
        """(Re-)form the broadcast group: learner rank 0 and every rollout worker join a new generation."""
        learner = self.learners[0]
        if self.store is None:
            self.store = self._get(learner.host_weight_store.remote())
        self.generation += 1
        host, port = self.store
        address = GroupAddress(host, port, 1 + len(self.rollout), self.generation, self.backend, self.timeout_s)
        log.info("forming the weight broadcast group (generation %d, %d members)", self.generation,
                 address.world_size)
        self._get([learner.join_weight_group.remote(address)]
                  + [w.join_weight_group.remote(address, rank + 1) for rank, w in enumerate(self.rollout)],
                  "weight group")
