"""Checkpoints: weights as safetensors, optimiser state, loop state as JSON, and a `latest` marker.

Layout of `runs/<name>/checkpoints/iter_000010/`:
  weights/                   what diffusers loads (LoRA: pytorch_lora_weights.safetensors; full: a transformer folder)
  trainable.safetensors      the trainable tensors exactly as the policy holds them (what resume loads)
  optimizer/                 optimiser state (torch state dict, or DeepSpeed's own files)
  state.json                 iteration, prompt sampler, RNG, scheduler statistics
A checkpoint is written into a temporary folder and renamed into place; `checkpoints/latest` (the folder name)
is replaced atomically last. A crash at any point leaves the previous checkpoint and marker intact.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def staging_dir(root: Path, iteration: int) -> Path:
    """Where checkpoint `iteration` is assembled before it is renamed into place."""
    return root / f".tmp_iter_{iteration:06d}"


def start_checkpoint(root: Path, iteration: int, policy, loop_state: dict[str, Any]) -> Path:
    """Create a fresh staging folder with the weights and the loop state; returns it."""
    staging = staging_dir(root, iteration)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    policy.save_weights(staging / "weights")
    state = {k: v.contiguous() for k, v in policy.trainable_state_dict().items()}
    save_file(state, str(staging / "trainable.safetensors"))
    (staging / "optimizer").mkdir()
    (staging / "state.json").write_text(json.dumps({"iteration": iteration, **loop_state}, indent=1))
    return staging


def publish_checkpoint(root: Path, iteration: int) -> Path:
    """Rename the staged checkpoint into place, then point `latest` at it (the atomic last step)."""
    final = root / f"iter_{iteration:06d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging_dir(root, iteration), final)
    _atomic_write_text(root / "latest", final.name)
    return final


def save_checkpoint(
    root: Path,
    iteration: int,
    policy,
    loop_state: dict[str, Any],
    save_optimizer: Callable[[Path], None],
) -> Path:
    """Write checkpoint `iteration` under `root` (the run's checkpoints folder) and point `latest` at it."""
    staging = start_checkpoint(root, iteration, policy, loop_state)
    save_optimizer(staging / "optimizer")
    return publish_checkpoint(root, iteration)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / checkpoints folder whose `latest` marker names one."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        marker = candidate / "latest"
        if marker.is_file():
            path = candidate / marker.read_text().strip()
            break
    if not (path / "trainable.safetensors").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected trainable.safetensors, or a 'latest' marker)")
    return path


def load_checkpoint(path: str | Path, policy) -> dict[str, Any]:
    """Load the trainable weights into `policy`; return the loop state (with `path`, the resolved folder)."""
    folder = resolve_checkpoint(path)
    policy.load_trainable_state_dict(load_file(str(folder / "trainable.safetensors")))
    state = json.loads((folder / "state.json").read_text())
    state["path"] = str(folder)
    return state


def save_torch_optimizer(optimizer: torch.optim.Optimizer) -> Callable[[Path], None]:
    return lambda folder: torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def load_torch_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer" / "optimizer.pt", weights_only=True))
