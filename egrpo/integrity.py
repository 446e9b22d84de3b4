"""Keeping a run's data: the guard against rerunning into a run folder, and checkpoint manifests.

Light on purpose (no torch): the CLI imports it to answer at once, before any model or Ray actor loads.

Manifest: `manifest.json` in a checkpoint folder, written after every other file of the checkpoint is complete
and before the folder is published (egrpo.checkpoint.publish_checkpoint, which both the in-process loop and the
Ray learners use):
  {"format": 1, "algorithm": "sha256",
   "files": {"state.json": {"size": 346, "sha256": "9f2c..."}, "trainable.safetensors": {...}, ...}}
`files` lists every file under the folder (relative POSIX paths) except the manifest itself. A checkpoint written
since manifests exist says so in its state.json (`"manifest": "manifest.json"`), so one whose manifest is missing
is incomplete. A checkpoint from before (no manifest, and a state.json without that key) loads unverified,
with a warning: nothing recorded what its files should be.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("egrpo")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
HASH_THREADS = 8  # hashlib releases the GIL: the files of a checkpoint (ZeRO shards) hash in parallel
RUN_FILES = ("metrics.jsonl", "checkpoints")  # what makes a folder hold a run that a fresh start would overwrite


class RunDataError(Exception):
    """Going on would lose or misuse a run's data; the message (one line) says what to do instead. The CLI prints
    it and exits 2."""


class RunExistsError(RunDataError):
    """`egrpo train` without --resume into a folder that already holds a run."""


class CheckpointError(RunDataError):
    """A checkpoint is damaged or incomplete (a file missing, truncated or changed since it was written)."""


# ------------------------------------------------------------------------------------------------ run folder


def run_contents(run_dir: Path) -> list[str]:
    """What in `run_dir` a fresh run would overwrite: a metrics.jsonl with records, a non-empty checkpoints/."""
    found = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append("checkpoints/")
    return found


def aside_path(run_dir: Path) -> Path:
    """`<run_dir>.old-<YYYYmmdd-HHMMSS>` (with `-2`, `-3`... when taken): where --overwrite moves a run."""
    stem = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    path, k = stem, 1
    while path.exists():
        k += 1
        path = stem.with_name(f"{stem.name}-{k}")
    return path


def guard_run_folder(run_dir: Path, overwrite: bool) -> Path | None:
    """Before a fresh (not resumed) run: refuse a folder that holds a run, unless `overwrite`, which renames the
    whole folder aside (nothing is deleted). Returns where it went, or None when nothing was there."""
    found = run_contents(run_dir)
    if not found:
        return None
    if not overwrite:
        raise RunExistsError(
            f"{run_dir} already holds a run ({', '.join(found)}); nothing was changed. Continue it with "
            f"--resume auto; start over with --overwrite (moves the folder to {run_dir}.old-<time>, deletes "
            f"nothing); or train into a new folder with --set run.name=NEW")
    aside = aside_path(run_dir)
    os.replace(run_dir, aside)
    log.warning("--overwrite: moved the previous run %s to %s", run_dir, aside)
    return aside


# ------------------------------------------------------------------------------------------------ manifests


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_all(folder: Path, names: list[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(HASH_THREADS, max(1, len(names)))) as pool:
        return list(pool.map(lambda name: _sha256(folder / name), names))


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp"))


def _size_text(size: int) -> str:
    return f"{size / 2**30:.2f} GB" if size >= 2**30 else f"{size / 2**20:.1f} MB"


def write_manifest(folder: Path, name: str | None = None) -> Path:
    """Record the size and sha256 of every file under `folder` in `folder/manifest.json`; call it when every
    other file is complete. Written to a temporary file, synced and renamed, so a crash leaves no manifest (an
    incomplete checkpoint) rather than a partial one. Hashing reads every byte: about a second per GB (logged).
    `name`: the checkpoint's name in the log (the staging folder's own name means nothing to a reader)."""
    start = time.perf_counter()
    names = _files(folder)
    sizes = [(folder / name).stat().st_size for name in names]
    digests = _hash_all(folder, names)
    files = {n: {"size": s, "sha256": d} for n, s, d in zip(names, sizes, digests, strict=True)}
    text = json.dumps({"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}, indent=1)
    path = folder / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    log.info("checkpoint %s: manifest of %d files (%s), sha256 in %.1f s", name or folder.name, len(names),
             _size_text(sum(sizes)), time.perf_counter() - start)
    return path


# Folders verified in this process, with the (name, size, mtime) of their files then: verifying the same
# unchanged checkpoint again (the CLI checks it, then the trainer loads it) reads nothing twice. A folder from
# before manifests is recorded with () once warned about.
_verified: dict[str, tuple] = {}


def _fingerprint(folder: Path, names: list[str]) -> tuple:
    stats = [(folder / n).stat() for n in names]
    return tuple((n, s.st_size, s.st_mtime_ns) for n, s in zip(names, stats, strict=True))


def _unmanifested_damage(folder: Path) -> str | None:
    """A folder without a manifest: incomplete when its state.json says it should have one (it was written by
    this code and cut off before the manifest), otherwise from before manifests (None, with a warning)."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except FileNotFoundError:
        return "state.json is missing"
    except (ValueError, UnicodeDecodeError):
        return "state.json is not valid JSON (truncated or corrupt)"
    if state.get("manifest"):
        return f"{MANIFEST} is missing (the checkpoint was not finished)"
    if str(folder.resolve()) in _verified:
        return None
    _verified[str(folder.resolve())] = ()
    log.warning("checkpoint %s has no %s (written before egrpo verified checkpoints): loading it unverified",
                folder, MANIFEST)
    return None


def checkpoint_damage(folder: Path) -> str | None:
    """Why checkpoint `folder` cannot be trusted ("trainable.safetensors is truncated: ..."), or None when every
    file has its manifest's size and sha256 (or the folder is from before manifests; see the module docstring).
    Sizes are checked first (instant), then hashes (about a second per GB, logged)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return _unmanifested_damage(folder)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST} is not a valid manifest (truncated or corrupt)"
    names = sorted(files)
    for name in names:
        path, want = folder / name, files[name]["size"]
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want:
            return f"{name} is {'truncated' if size < want else 'longer than written'}: {size} of {want} bytes"
    fingerprint = _fingerprint(folder, names)
    if _verified.get(str(folder.resolve())) == fingerprint:
        return None
    start = time.perf_counter()
    for name, digest in zip(names, _hash_all(folder, names), strict=True):
        if digest != files[name]["sha256"]:
            return f"{name} is corrupt: its sha256 differs from the manifest's"
    _verified[str(folder.resolve())] = fingerprint
    log.info("checkpoint %s verified: %d files (%s), sha256 in %.1f s", folder, len(names),
             _size_text(sum(files[n]["size"] for n in names)), time.perf_counter() - start)
    return None
