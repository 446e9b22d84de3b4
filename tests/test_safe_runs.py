"""Data is never lost: a rerun into a run folder is refused (or moves it aside), a finished run is left as it is,
a resumed run keeps the base model's samples, and checkpoints are verified against their manifests before they
load. In-process (runtime.backend=local) on the toy recipe, the CLI as a subprocess where its exit code matters;
the one test that starts Ray is named test_ray_* (deselect it with -k "not ray")."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from egrpo.checkpoint import checkpoint_to_resume, verified_checkpoint
from egrpo.config import load_config
from egrpo.integrity import MANIFEST, CheckpointError, checkpoint_damage, write_manifest
from egrpo.report import START_IMAGES, load_start_images
from egrpo.trainer import Trainer

RECIPE = Path(__file__).parents[1] / "launch" / "configs" / "toy-egrpo.yaml"
SMALL = ["run.wandb=disabled", "runtime.backend=local", "plan.prompts_per_iteration=1", "plan.group_size=2",
         "train.eval_prompts=2", "train.eval_seeds=1", "train.checkpoint_every=1", "train.eval_every=0"]
ITERATIONS = 2  # the finished run: checkpoints iter_000001 and iter_000002


def _overrides(parent: Path, *extra: str) -> list[str]:
    return [f"run.dir={parent}", *SMALL, f"train.iterations={ITERATIONS}", *extra]


def _config(parent: Path, *extra: str):
    return load_config(RECIPE, _overrides(parent, *extra))


def _cli(command: str, parent: Path, *args: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    sets = [a for o in _overrides(parent, *extra) for a in ("--set", o)]
    return subprocess.run([sys.executable, "-m", "egrpo.cli", command, str(RECIPE), *sets, *args],
                          capture_output=True, text=True, timeout=300)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and its mtime."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _message(result: subprocess.CompletedProcess) -> str:
    """The CLI's one-line answer on stderr (the last line; log lines may come before it)."""
    lines = result.stderr.strip().splitlines()
    assert lines, result
    return lines[-1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished toy run of ITERATIONS iterations, a checkpoint after each; tests work on copies of it."""
    parent = tmp_path_factory.mktemp("finished")
    Trainer(_config(parent)).run()
    return parent


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """This test's own copy of the finished run folder (file times kept); its parent is the run.dir."""
    folder = tmp_path / "toy-egrpo"
    shutil.copytree(finished / "toy-egrpo", folder)
    return folder


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------- the run folder


def test_a_rerun_into_a_run_folder_is_refused_and_changes_nothing(run: Path):
    before = _snapshot(run)
    result = _cli("train", run.parent)
    assert result.returncode == 2, result.stderr[-2000:]
    message = _message(result)
    assert str(run) in message and "--resume auto" in message and "--overwrite" in message
    assert "run.name=NEW" in message and "held-out reward" not in result.stderr  # stopped before any model
    assert _snapshot(run) == before
    assert [p.name for p in run.parent.iterdir()] == ["toy-egrpo"]


def test_overwrite_moves_the_old_run_aside_and_starts_fresh(run: Path):
    before = _snapshot(run)
    result = _cli("train", run.parent, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    (aside,) = run.parent.glob("toy-egrpo.old-*")
    assert _snapshot(aside) == before  # moved, byte for byte
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(ITERATIONS + 1))


def test_resume_and_overwrite_do_not_go_together(run: Path):
    result = _cli("train", run.parent, "--resume", "--overwrite")
    assert result.returncode == 2 and "not allowed with" in result.stderr


# ------------------------------------------------------------------------------------------- resuming


def test_resume_on_a_finished_run_says_so_and_changes_nothing(run: Path):
    before = _snapshot(run)
    result = _cli("train", run.parent, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "complete" in result.stdout and f"train.iterations=N, with N > {ITERATIONS}" in result.stdout
    assert "--resume auto" in result.stdout
    assert _snapshot(run) == before


def test_a_resumed_run_keeps_the_base_models_start_row(run: Path, tmp_path: Path, monkeypatch):
    """The base model's held-out samples are kept at the start and are the first row of samples.png after a
    resume; they equal a fresh evaluation of the base model."""
    import egrpo.trainer

    grids = []
    save_grid = egrpo.trainer.save_image_grid
    monkeypatch.setattr(egrpo.trainer, "save_image_grid",
                        lambda rows, labels, *a: (grids.append((rows, labels)), save_grid(rows, labels, *a)))
    stored_bytes = (run / START_IMAGES).read_bytes()
    cfg = _config(run.parent, f"train.iterations={ITERATIONS + 1}")
    trainer = Trainer(cfg, resume="auto")
    assert trainer.start_iteration == ITERATIONS
    trainer.run()
    (rows, labels), = grids
    assert labels == ["start", "end"]
    assert (run / START_IMAGES).read_bytes() == stored_bytes
    base = Trainer(_config(tmp_path / "base"))
    try:
        _, base_images = base.evaluate()
    finally:
        base.close()
    shown = len(rows[0])
    assert shown == 2 and rows[0].dtype == torch.uint8 and torch.equal(rows[0], base_images[:shown])
    assert not torch.equal(rows[1], rows[0])  # the end row is the trained policy's


def test_start_images_are_for_the_prompts_they_show(tmp_path: Path):
    from egrpo.report import save_start_images

    path = tmp_path / START_IMAGES
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    save_start_images(path, images, ["a", "b"])
    assert torch.equal(load_start_images(path, ["a", "b"]), images)
    assert load_start_images(path, ["a", "c"]) is None and load_start_images(tmp_path / "none", ["a"]) is None


# ------------------------------------------------------------------------------------------- verified checkpoints


def test_a_truncated_checkpoint_file_stops_resume_naming_it(run: Path):
    damaged = run / "checkpoints" / "iter_000002"
    _truncate(damaged / "trainable.safetensors")
    before = _snapshot(run)
    for target in (damaged, run):  # the checkpoint folder, or the run folder (its `latest`)
        result = _cli("train", run.parent, "--resume", str(target), extra=(f"train.iterations={ITERATIONS + 1}",))
        assert result.returncode == 2, result.stderr[-2000:]
        message = _message(result)
        assert "trainable.safetensors is truncated" in message and str(damaged) in message
        assert f"--resume {run / 'checkpoints' / 'iter_000001'}" in message
        assert "resumed from" not in result.stderr
    assert _snapshot(run) == before


def test_auto_resume_falls_back_to_the_previous_intact_checkpoint(run: Path):
    """The newest checkpoint changed on disk (same size): --resume auto skips it, says so, resumes from the one
    before, and retrains the lost iteration, writing its checkpoint anew."""
    damaged = run / "checkpoints" / "iter_000002"
    _flip_a_byte(damaged / "optimizer" / "optimizer.pt")
    result = _cli("train", run.parent, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "optimizer/optimizer.pt is corrupt" in result.stderr
    assert "skipped the damaged iter_000002" in result.stderr and "1 iterations done" in result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(ITERATIONS + 1))
    assert checkpoint_damage(damaged) is None  # rewritten by the resumed run


def test_eval_of_a_damaged_checkpoint_stops_naming_the_file(run: Path, tmp_path: Path):
    (run / "checkpoints" / "iter_000002" / "weights" / "pytorch_lora_weights.safetensors").unlink()
    out = tmp_path / "eval"
    result = _cli("eval", run.parent, "--checkpoint", str(run), "--out", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    message = _message(result)
    assert "weights/pytorch_lora_weights.safetensors is missing" in message
    assert f"--checkpoint {run / 'checkpoints' / 'iter_000001'}" in message
    assert not out.exists()


def test_no_intact_checkpoint_left_is_an_error_naming_each(run: Path):
    for folder in (run / "checkpoints").glob("iter_*"):
        _truncate(folder / "state.json")
    with pytest.raises(CheckpointError, match="iter_000002 .*state.json is truncated.*iter_000001 .*truncated"):
        checkpoint_to_resume(run, "auto")


def test_the_manifest_names_what_is_missing_truncated_or_changed(tmp_path: Path):
    folder = tmp_path / "iter_000004"
    (folder / "sub").mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"iteration": 3, "manifest": MANIFEST}))
    (folder / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    write_manifest(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["algorithm"] == "sha256" and set(manifest["files"]) == {"state.json", "sub/weights.bin"}
    assert manifest["files"]["sub/weights.bin"]["size"] == 256 * 64
    assert checkpoint_damage(folder) is None
    _flip_a_byte(folder / "sub" / "weights.bin")
    assert checkpoint_damage(folder) == "sub/weights.bin is corrupt: its sha256 differs from the manifest's"
    (folder / "sub" / "weights.bin").write_bytes(b"x")
    assert checkpoint_damage(folder) == "sub/weights.bin is truncated: 1 of 16384 bytes"
    (folder / "sub" / "weights.bin").unlink()
    assert checkpoint_damage(folder) == "sub/weights.bin is missing"
    (folder / MANIFEST).write_text('{"format": 1, "files": {"sta')
    assert "manifest.json is not a valid manifest" in checkpoint_damage(folder)
    (folder / MANIFEST).unlink()  # cut off before its manifest: state.json says it should have one
    assert checkpoint_damage(folder) == "manifest.json is missing (the checkpoint was not finished)"


def test_a_checkpoint_from_before_manifests_loads_with_a_warning(run: Path, caplog):
    folder = run / "checkpoints" / "iter_000002"
    (folder / MANIFEST).unlink()
    state = json.loads((folder / "state.json").read_text())
    del state["manifest"]
    (folder / "state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="egrpo"):
        assert verified_checkpoint(run) == folder
    assert "has no manifest.json" in caplog.text and "unverified" in caplog.text


def test_deepspeed_learner_checkpoint_has_a_manifest(tmp_path: Path):
    """The learners' writer (DeepSpeedLearner.save_checkpoint: rank 0 stages, every rank adds its ZeRO shard)
    publishes through the same manifest: DeepSpeed's files are listed, and a truncated one stops a resume. One
    rank in this process, no Ray."""
    from egrpo.runtime.learner import DeepSpeedLearner, LearnerSettings, free_port
    from egrpo.trainer import load_policy

    cfg = _config(tmp_path)
    learner = DeepSpeedLearner(load_policy(cfg), cfg.train, "mean", LearnerSettings(zero_stage=2,
                                                                                    master_port=free_port()))
    try:
        folder = learner.save_checkpoint(tmp_path / "checkpoints", 0, {"scheduler": {}})
    finally:
        learner.close()
    files = json.loads((folder / MANIFEST).read_text())["files"]
    shards = sorted(name for name in files if name.startswith("optimizer/deepspeed/"))
    assert shards and set(files) == {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                                     if p.is_file() and p.name != MANIFEST}
    assert checkpoint_damage(folder) is None
    _truncate(folder / shards[0])
    with pytest.raises(CheckpointError, match=re.escape(f"{shards[0]} is truncated")):
        verified_checkpoint(tmp_path, "--resume")


# ------------------------------------------------------------------------------------------- Ray (run apart)


def test_ray_checkpoint_has_a_verified_manifest(tmp_path: Path, local_ray):
    """RayTrainer's checkpoints (two DeepSpeed learners, ZeRO 2: a shard each) carry a manifest of every file,
    the run keeps its start images, and a truncated shard stops a resume naming it."""
    from egrpo.runtime.driver import RayTrainer

    cfg = load_config(RECIPE, [f"run.dir={tmp_path}", *SMALL, "runtime.backend=ray", "train.iterations=1",
                               "runtime.learners=2", "runtime.zero_stage=2", "runtime.dashboard=false",
                               "runtime.timeout_s=300"])
    outputs = RayTrainer(cfg).run()
    folder = outputs.checkpoint
    files = json.loads((folder / MANIFEST).read_text())["files"]
    assert set(files) == {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                          if p.is_file() and p.name != MANIFEST}
    shards = sorted(name for name in files if "optim_states" in name)
    assert len(shards) == 2 and checkpoint_damage(folder) is None
    assert (cfg.run_dir / START_IMAGES).is_file()
    _truncate(folder / shards[1])
    with pytest.raises(CheckpointError, match=re.escape(f"{shards[1]} is truncated")):
        checkpoint_to_resume(cfg.run_dir, "auto")


def test_resume_without_a_checkpoint_stops_before_ray(tmp_path: Path):
    """`--resume auto` on a run folder with no checkpoint: one line and exit 2 in seconds, no Ray started
    (runtime.backend stays ray; it took 52 s and actors before)."""
    start = time.perf_counter()
    result = _cli("train", tmp_path, "--resume", "auto", extra=("runtime.backend=ray",))
    assert result.returncode == 2 and time.perf_counter() - start < 60
    assert "no checkpoint at" in _message(result) and "Ray" not in result.stderr
