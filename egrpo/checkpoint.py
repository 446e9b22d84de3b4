"""Checkpoints: weights as safetensors, optimiser state, loop state as JSON, and a `latest` marker.

Layout of `runs/<name>/checkpoints/iter_000010/` (after 10 iterations, `checkpoint_name`):
  weights/                   what diffusers loads (LoRA: pytorch_lora_weights.safetensors; full: a transformer folder)
  trainable.safetensors      the trainable tensors exactly as the policy holds them (what resume loads)
  optimizer/                 optimiser state (torch state dict, or DeepSpeed's own files)
  state.json                 iteration, prompt sampler, RNG, scheduler statistics
  manifest.json              size and sha256 of every other file (egrpo.integrity), written after them
A checkpoint is written into a temporary folder and renamed into place; `checkpoints/latest` (the folder name)
is replaced atomically last. A crash at any point leaves the previous checkpoint and marker intact.

Before anything is loaded from a checkpoint (resume, `egrpo eval`, `sample`, `plan`), its files are checked
against its manifest (`verified_checkpoint`): a missing, truncated or changed file stops with a CheckpointError
naming it and the previous intact checkpoint; `--resume auto` takes the newest intact one instead
(`checkpoint_to_resume`). A checkpoint from before manifests loads unverified, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from egrpo.integrity import MANIFEST, CheckpointError, checkpoint_damage, write_manifest

log = logging.getLogger("egrpo")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_name(iteration: int) -> str:
    """The folder of the checkpoint taken after loop iteration `iteration` (0-based): named by the iterations
    done, `iter_000080` after the 80th, the number metrics.jsonl, `egrpo eval` and `egrpo sample` show."""
    return f"iter_{iteration + 1:06d}"


def staging_dir(root: Path, iteration: int) -> Path:
    """Where checkpoint `iteration` is assembled before it is renamed into place."""
    return root / f".tmp_{checkpoint_name(iteration)}"


def start_checkpoint(root: Path, iteration: int, policy, loop_state: dict[str, Any]) -> Path:
    """Create a fresh staging folder with the weights and the loop state; returns it."""
    staging = staging_dir(root, iteration)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    policy.save_weights(staging / "weights")
    state = {k: v.contiguous() for k, v in policy.trainable_state_dict().items()}
    save_file(state, str(staging / "trainable.safetensors"))
    (staging / "optimizer").mkdir()
    # "manifest": this checkpoint gets one, so a copy of it without one is incomplete (egrpo.integrity)
    state = {"iteration": iteration, **loop_state, "manifest": MANIFEST}
    (staging / "state.json").write_text(json.dumps(state, indent=1))
    return staging


def publish_checkpoint(root: Path, iteration: int) -> Path:
    """Record the staged files' sizes and hashes (the manifest), rename the folder into place, then point
    `latest` at it (the atomic last step). Every writer (in-process loop, Ray learners) publishes through here."""
    final = root / checkpoint_name(iteration)
    write_manifest(staging_dir(root, iteration), final.name)
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
    if not any((path / name).is_file() for name in ("trainable.safetensors", MANIFEST)):
        raise FileNotFoundError(f"no checkpoint at {path} (expected trainable.safetensors, or a 'latest' marker)")
    return path


def _iteration_of(folder: Path) -> int | None:
    """The iterations done in a checkpoint folder's name (`iter_000010` -> 10); None for any other name."""
    match = re.fullmatch(r"iter_(\d+)", folder.name)
    return int(match.group(1)) if match else None


def checkpoints_newest_first(root: Path, below: int | None = None) -> list[Path]:
    """The checkpoint folders (`iter_*`) under `root`, newest first; with `below`, only older iterations."""
    found = [(it, p) for p in root.glob("iter_*") if p.is_dir() and (it := _iteration_of(p)) is not None]
    return [p for it, p in sorted(found, reverse=True) if below is None or it < below]


def previous_intact(folder: Path) -> Path | None:
    """The newest intact checkpoint older than `folder`, among its siblings (verifying them in turn)."""
    iteration = _iteration_of(folder)
    if iteration is None:
        return None
    return next((p for p in checkpoints_newest_first(folder.parent, iteration) if checkpoint_damage(p) is None),
                None)


def verified_checkpoint(path: str | Path, flag: str = "--checkpoint") -> Path:
    """`resolve_checkpoint(path)`, its files checked against its manifest before anything loads. A damaged one
    raises CheckpointError naming the file and offering the previous intact checkpoint as `flag PATH` (the
    option of the command that is running: --resume, --checkpoint)."""
    folder = resolve_checkpoint(path)
    damage = checkpoint_damage(folder)
    if damage is None:
        return folder
    previous = previous_intact(folder)
    offer = (f"The previous intact checkpoint is {previous}: use {flag} {previous}" if previous is not None
             else "No earlier checkpoint of this run is intact")
    raise CheckpointError(f"checkpoint {folder} is damaged: {damage}; nothing was loaded. {offer}")


def checkpoint_to_resume(run_dir: Path, resume: str) -> Path:
    """The verified checkpoint that `--resume` names. A path: that checkpoint (`verified_checkpoint`). "auto":
    the newest intact checkpoint of `run_dir` at or before its `latest` marker (later folders may be left over
    from a run that was resumed from an earlier point), skipping damaged ones with a warning."""
    if resume != "auto":
        return verified_checkpoint(resume, "--resume")
    root = Path(run_dir) / "checkpoints"
    marker = root / "latest"
    latest = _iteration_of(root / marker.read_text().strip()) if marker.is_file() else None
    candidates = checkpoints_newest_first(root, None if latest is None else latest + 1)
    if not candidates:
        return resolve_checkpoint(run_dir)  # nothing to choose from: its FileNotFoundError says what is missing
    skipped: dict[str, str] = {}  # folder name -> what is damaged
    for folder in candidates:
        damage = checkpoint_damage(folder)
        if damage is None:
            if skipped:
                log.warning("--resume auto: skipped the damaged %s; resuming from %s, the newest intact checkpoint",
                            ", ".join(skipped), folder.name)
            return folder
        log.warning("--resume auto: checkpoint %s is damaged: %s", folder, damage)
        skipped[folder.name] = damage
    damaged = "; ".join(f"{name} ({damage})" for name, damage in skipped.items())
    raise CheckpointError(f"no intact checkpoint in {root}: {damaged}; nothing was loaded. Start over "
                          f"with --overwrite (moves the run folder aside) or --set run.name=NEW")


def load_checkpoint(path: str | Path, policy) -> dict[str, Any]:
    """Load the trainable weights into `policy`; return the loop state (with `path`, the resolved folder).
    The checkpoint is verified first (`verified_checkpoint`; free when it already was in this process)."""
    folder = verified_checkpoint(path)
    policy.load_trainable_state_dict(load_file(str(folder / "trainable.safetensors")))
    state = json.loads((folder / "state.json").read_text())
    state["path"] = str(folder)
    return state


def save_torch_optimizer(optimizer: torch.optim.Optimizer) -> Callable[[Path], None]:
    return lambda folder: torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def load_torch_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer" / "optimizer.pt", weights_only=True))
