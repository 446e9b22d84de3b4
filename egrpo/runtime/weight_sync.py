"""Full-weight sync: learner rank 0 broadcasts the trained weights to the rollout workers over torch.distributed.

LoRA adapters are small and go through the Ray object store. Full weights (FLUX.1-dev: 12B parameters) would
be copied into the object store and out again on every node, so they travel by a collective broadcast
instead (NCCL on GPU, gloo on CPU), in a process group of their own: rank 0 is learner rank 0, ranks 1..N are
the rollout workers. It is not the learners' DeepSpeed world, and it is built without `init_process_group`,
so a process may belong to both.

- The members meet through a `TCPStore` hosted by learner rank 0 (`WeightStore`).
- Tensors go in flat buckets of one dtype of at most `bucket_bytes`: few collective calls, and a bounded
  extra buffer on each side.
- A process group with a dead member cannot be repaired. When a rollout worker restarts, every member
  joins a new *generation* of the group, a fresh key prefix in the same store (`join`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


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


def join(address: GroupAddress, rank: int, store: dist.Store | None = None) -> dist.ProcessGroup:
    """This process's member of the group's current generation (rank 0 passes the store it hosts)."""
    timeout = timedelta(seconds=address.timeout_s)
    if store is None:
        store = dist.TCPStore(address.host, address.port, is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"egrpo-weights/{address.generation}", store)
    if address.backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, address.world_size, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(prefixed, rank, address.world_size, timeout)


def buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[str]]:
    """Names of `state` in sorted order, cut into runs of one dtype of at most `bucket_bytes` (a tensor larger
    than a bucket travels alone). Sender and receivers compute the same cut from the same names and shapes."""
    cut: list[list[str]] = []
    size, dtype = 0, None
    for name in sorted(state):
        tensor = state[name]
        nbytes = tensor.numel() * tensor.element_size()
        if not cut or tensor.dtype != dtype or size + nbytes > bucket_bytes:
            cut.append([])
            size, dtype = 0, tensor.dtype
        cut[-1].append(name)
        size += nbytes
    return cut


def broadcast_state(
    group: dist.ProcessGroup, state: dict[str, torch.Tensor], bucket_bytes: int, device: torch.device
) -> int:
    """Broadcast rank 0's `state` into every other rank's `state` (same names, shapes, dtypes; filled in
    place, so live parameters update the model). Buckets are staged on `device` (the GPU for NCCL). Returns
    the number of collective calls."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    cut = buckets(state, bucket_bytes)
    for names in cut:
        flat = torch.cat([state[n].reshape(-1).to(device) for n in names])
        group.broadcast([flat], options).wait()
        if group.rank() == 0:
            continue
        offset = 0
        for n in names:
            count = state[n].numel()
            state[n].copy_(flat[offset : offset + count].view_as(state[n]))
            offset += count
    return len(cut)


def weights_checksum(state: dict[str, torch.Tensor]) -> float:
    """An order-independent float64 checksum of a state dict, to compare sender and receiver."""
    return float(sum(v.double().sum() * (i + 1) for i, (_, v) in enumerate(sorted(state.items()))))
