"""What both benchmarks share: the recipes, timing, the machine's description, tables and the JSON summary."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RECIPES = Path(__file__).parents[2] / "launch" / "configs"


def recipe(method: str) -> Path:
    """The toy-world recipe of a plan method (launch/configs/toy-<method>.yaml)."""
    return RECIPES / f"toy-{method}.yaml"


def _synchronize(device: torch.device | None) -> None:
    """Wait for queued GPU work, so that a timer read afterwards covers it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1,
                   device: torch.device | None = None) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls after `warmup` untimed ones (waiting for
    `device`'s queued work, on a GPU). The median, because the machines are shared: a neighbour's burst lands
    in a few calls, not in all of them."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) in MiB; Linux reports ru_maxrss in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (from /proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where the numbers were measured; goes into every summary."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def describe_machine(info: dict[str, Any]) -> str:
    gpu = info.get("gpu", "no GPU")
    return f"{info['cpu']}, {info['cpus']} CPUs, torch threads {info['torch_threads']}, {gpu}, torch {info['torch']}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable in a terminal, and pasted as is into BENCHMARKS.md)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    """`summary.json` under `out`. NaN and infinity are refused (they are not JSON): a quantity that does not
    exist, such as the NFE to a reward never reached, is null."""
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return path


def figure(panels: int = 1, width: float = 6.0, height: float = 4.0) -> tuple[Any, list[Any]]:
    """A figure with `panels` axes side by side. egrpo.report sets matplotlib's file backend; it is imported
    here, not at the top, so that actor processes importing this module stay light."""
    from egrpo.report import plt

    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, path: Path) -> Path:
    """Save as a small PNG (commit-sized) and free the figure."""
    from egrpo.report import plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
