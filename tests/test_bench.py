"""The benchmarks in their --quick settings run end to end and write well-formed outputs. Nothing here checks
a measured number against a target: benchmarks report, they never fail on a number.

The system benchmark starts a real local Ray (run it under `flock /tmp/egrpo-ray.lock` on shared machines)."""

import json
import math
import struct
from pathlib import Path

import ray
import torch

from egrpo import cli
from egrpo.bench import algorithms, system
from egrpo.bench.gpu import TINY, flux_measurements

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for value in tree.values() for x in _numbers(value)]
    if isinstance(tree, list):
        return [x for value in tree for x in _numbers(value)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def _assert_finite(tree) -> None:
    numbers = _numbers(tree)
    assert numbers and all(math.isfinite(x) for x in numbers)


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    assert len(data) < 300_000  # commit-sized


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_algorithms_quick(tmp_path, capsys):
    assert cli.main(["bench", "algorithms", "--quick", "--out", str(tmp_path)]) == 0  # through the command
    summary = _summary(tmp_path)
    assert list(summary["methods"]) == list(algorithms.METHODS)
    _assert_finite(summary)
    for name, method in summary["methods"].items():
        assert method["nfe"] >= summary["budget_nfe"] > 0, name  # every method spent the same budget
        assert len(method["curve"]) == algorithms.QUICK.evals + 1
        assert len(method["final_reward"]["seeds"]) == algorithms.QUICK.seeds
        assert 0 < method["final_reward"]["mean"] <= 3  # three rewards in [0, 1], weighted 1, 0, 1
        assert math.isclose(sum(method["nfe_share"].values()), 1.0)
    assert summary["methods"]["aegpo"]["probe_time_share"] > 0
    assert summary["methods"]["aegpo"]["nfe_share"]["probe"] > 0
    assert len(summary["targets"]) == 5  # egrpo and both AEGPO readings: NFE; both AEGPO readings: probe share
    for figure in summary["figures"].values():
        _assert_png(Path(figure))
    printed = capsys.readouterr().out
    assert all(f"| {name}" in printed for name in algorithms.METHODS)


def test_system_quick_on_a_local_ray(tmp_path, capsys):
    connected = ray.is_initialized()
    assert system.main(quick=True, gpu=True, out=tmp_path) == 0
    assert ray.is_initialized() == connected  # a Ray the benchmark started, it shut down
    summary = _summary(tmp_path)
    _assert_finite(summary)
    variants = summary["runtime"]["variants"]
    assert list(variants) == ["in-process", "ray", "ray + overlap"]
    for variant in variants.values():
        assert variant["images_per_s"] > 0 and variant["throughput_ratio"] > 0
        assert set(variant["phases"]) == {*system.PHASES, "other"}
    assert variants["ray + overlap"]["staleness_max"] == 1 and variants["ray"]["staleness_max"] == 0
    assert set(summary["runtime"]["peak_memory_mib"]) == {"driver", "scheduler", "rollout", "reward", "learner"}
    assert [r["probe"] for r in summary["probe"]] == ["all blocks", "first block"]
    assert [r["state"] for r in summary["weight_sync"]] == ["toy lora", "toy full", "16 MiB"]
    assert all(r["broadcast_gb_per_s"] > 0 and r["object_store_gb_per_s"] > 0 for r in summary["weight_sync"])
    assert {(r["method"], r["prompts"]) for r in summary["scheduler"]} == {
        (m, p) for m in ("grpo", "egrpo", "aegpo") for p in system.QUICK.scheduler_prompts}
    if torch.cuda.is_available():
        assert summary["gpu"]["rollout"]["images_per_s"] > 0
    else:
        assert "CUDA is not available" in summary["gpu"]["skipped"]
    for figure in summary["figures"].values():
        _assert_png(Path(figure))
    assert "weight sync" in capsys.readouterr().out


def test_the_gpu_section_runs_on_a_tiny_transformer_on_the_cpu():
    """The --gpu section's code, at a size the CPU runs in seconds, so that it cannot rot where no GPU is."""
    result = flux_measurements(TINY, torch.device("cpu"), torch.float32, quick=True)
    _assert_finite(result)
    assert result["rollout"]["nfe"] == 2 * 4  # 2 prompts x 1 sample x 4 steps
    assert result["learn"]["trained_steps"] > 0
    assert set(result["weight_sync"]) == {"full", "lora r=32"}
    assert result["weight_sync"]["full"]["bytes"] == 4 * result["parameters"]
