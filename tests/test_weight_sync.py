"""Full-weight broadcast (egrpo.runtime.weight_sync) between real processes over gloo, without Ray."""

import multiprocessing as mp
import socket

import torch

from egrpo.runtime.weight_sync import GroupAddress, broadcast_state, buckets, host_store, join, tensor_specs

BUCKET = 1000  # bytes: forces several buckets


def _state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(7, 5, generator=generator),
        "b.bias": torch.randn(300, generator=generator),  # 1200 bytes: larger than a bucket, travels alone
        "c.weight": torch.randn(3, 3, generator=generator).to(torch.bfloat16),
        "d.step": torch.tensor([seed], dtype=torch.int64),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_buckets_are_sorted_single_dtype_and_bounded():
    state = _state(0)
    cut = buckets(tensor_specs(state), BUCKET)
    assert [n for names in cut for n in names] == sorted(state)
    for names in cut:
        assert len({state[n].dtype for n in names}) == 1
        assert len(names) == 1 or sum(state[n].numel() * state[n].element_size() for n in names) <= BUCKET
    assert ["b.bias"] in cut


def _member(address: GroupAddress, rank: int, seed: int, out) -> None:
    torch.set_num_threads(1)
    state = _state(seed)
    group = join(address, rank)
    calls = broadcast_state(group, state, BUCKET, torch.device("cpu"))
    out.put((rank, calls, {k: v.float().tolist() for k, v in state.items()}))


def _broadcast_round(store, address: GroupAddress, receivers: int) -> list:
    """Rank 0 here (the store's host, like learner rank 0); `receivers` fresh processes as ranks 1..N."""
    context = mp.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=_member, args=(address, rank, 100 + rank, out))
                 for rank in range(1, receivers + 1)]
    for p in processes:
        p.start()
    sent = _state(0)
    calls = broadcast_state(join(address, 0, store), sent, BUCKET, torch.device("cpu"))
    results = [out.get(timeout=120) for _ in processes]
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = {k: v.float().tolist() for k, v in sent.items()}
    for _rank, member_calls, received in results:
        assert member_calls == calls == len(buckets(tensor_specs(sent), BUCKET))
        assert received == expected  # every receiver now holds rank 0's tensors exactly
    return results


def test_broadcast_reaches_every_member_and_a_new_generation_takes_a_new_member():
    port = _free_port()
    store = host_store("127.0.0.1", port, timeout_s=60)
    first = GroupAddress("127.0.0.1", port, world_size=3, generation=0, backend="gloo", timeout_s=60)
    _broadcast_round(store, first, receivers=2)
    # the members of generation 0 have exited (as a restarted rollout worker's old process has): the same
    # store serves generation 1 with new processes
    second = GroupAddress("127.0.0.1", port, world_size=3, generation=1, backend="gloo", timeout_s=60)
    _broadcast_round(store, second, receivers=2)
