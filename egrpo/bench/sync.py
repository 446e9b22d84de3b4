"""Weight-sync measurements of `egrpo bench system`: broadcast against the Ray object store.

A state dict goes from this process (the sender, like learner rank 0) to receiver actors (rollout-worker
stand-ins without a model) by torch.distributed broadcast over gloo (egrpo.runtime.weight_sync, as
`RolloutWorker.receive_weights` gets full weights) and through the object store (`ray.put`, then `ray.get` in
each receiver, as `RolloutWorker.sync` gets LoRA weights). Either way it ends copied into the receiver's
preallocated tensors. This module is what the receivers import, so its imports are kept light.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from egrpo.bench.common import median_seconds
from egrpo.runtime.weight_sync import GroupAddress, broadcast_state, host_store, join

MiB = 2**20


@ray.remote(num_cpus=0)
class SyncReceiver:
    """A rollout worker's side of weight sync, without the model."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.group: Any = None
        self.state: dict[str, torch.Tensor] = {}

    def join(self, address: GroupAddress, rank: int) -> None:
        self.group = join(address, rank)

    def allocate(self, layout: dict[str, tuple[torch.Size, torch.dtype]]) -> None:
        self.state = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in layout.items()}

    def receive(self, bucket_bytes: int) -> None:
        broadcast_state(self.group, self.state, bucket_bytes, torch.device("cpu"))

    def fetch(self, weights: list) -> None:
        for name, tensor in ray.get(weights[0]).items():
            self.state[name].copy_(tensor)


def sync_states(recipe_path: Any, sizes_mib: tuple[int, ...]) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """(name, finetune mode, state): the recipe's model's LoRA and full trainable weights, then synthetic
    full-weight states of 4 MiB float32 tensors (layer-sized pieces, as a real model's state dict has)."""
    from egrpo.config import load_config
    from egrpo.trainer import load_policy

    states = []
    for finetune in ("lora", "full"):
        cfg = load_config(recipe_path, ["run.device=cpu", f"model.finetune={finetune}"])
        states.append((f"toy {finetune}", finetune, load_policy(cfg).trainable_state_dict()))
    for mib in sizes_mib:
        states.append((f"{mib} MiB", "full", {f"layer{i}.weight": torch.ones(MiB) for i in range(mib // 4)}))
    return states


def measure_sync(states: list[tuple[str, str, dict[str, torch.Tensor]]], receivers: int, bucket_bytes: int,
                 repeats: int, timeout_s: float = 300.0) -> list[dict[str, Any]]:
    """Median seconds until every receiver holds each state, by broadcast and through the object store;
    GB/s is the payload one receiver gets per second. Needs a connected Ray."""
    from egrpo.runtime.learner import free_port

    actors = [SyncReceiver.remote() for _ in range(receivers)]
    port = free_port()
    store = host_store("127.0.0.1", port, timeout_s)
    address = GroupAddress("127.0.0.1", port, 1 + receivers, 0, "gloo", timeout_s)
    joined = [a.join.remote(address, rank + 1) for rank, a in enumerate(actors)]
    group = join(address, 0, store)
    ray.get(joined, timeout=timeout_s)
    rows = []
    try:
        for name, finetune, state in states:
            layout = {key: (value.shape, value.dtype) for key, value in state.items()}
            ray.get([a.allocate.remote(layout) for a in actors], timeout=timeout_s)

            def broadcast(state=state) -> None:
                received = [a.receive.remote(bucket_bytes) for a in actors]
                broadcast_state(group, state, bucket_bytes, torch.device("cpu"))
                ray.get(received, timeout=timeout_s)

            def object_store(state=state) -> None:
                ref = ray.put(state)
                ray.get([a.fetch.remote([ref]) for a in actors], timeout=timeout_s)

            nbytes = sum(v.numel() * v.element_size() for v in state.values())
            row: dict[str, Any] = {"state": name, "finetune": finetune, "tensors": len(state), "bytes": nbytes}
            for path, fn in (("broadcast", broadcast), ("object_store", object_store)):
                seconds = median_seconds(fn, repeats)
                row[f"{path}_s"] = seconds
                row[f"{path}_gb_per_s"] = nbytes / seconds / 1e9
            rows.append(row)
    finally:
        for a in actors:
            ray.kill(a)
    return rows
