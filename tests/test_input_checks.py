"""Checks come before Ray: a model.path or a rewards.paths folder that its loader would fail on stops
`egrpo train` in seconds, with exit code 2 and one line naming the config key and the path, before Ray or any
model starts. Before these checks, a folder without model_index.json took 27 s and a 79-line traceback from
three dying actors, and a tokenizer with ids past its text model's vocabulary crashed scoring with an
IndexError.

The broken folders are the tiny twins (egrpo.models.tiny, egrpo.rewards.tiny) saved in the real layouts, then
damaged. The CLI runs in a subprocess on the Ray backend, with runtime.address set to a port nothing
listens on: were a check missing, the driver would fail to join (exit 3) rather than start a local Ray here.
The healthy twins pass the same checks, and loaders read nothing beyond the files their tables declare."""

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_rewards import save_reward_folders
from transformers import BertTokenizer, CLIPTokenizer

from egrpo.cli import check_input_files
from egrpo.config import ConfigError, load_config
from egrpo.models.families.flux import build_flux_pipeline
from egrpo.models.folder import check_pipeline_folder
from egrpo.models.tiny import save_pipeline
from egrpo.rewards.aesthetic import AESTHETIC_FILES
from egrpo.rewards.base import REWARD_NAMES, build_reward_models, check_reward_folder, score_all
from egrpo.rewards.clip import CLIP_FILES
from egrpo.rewards.hps import HPS_FILES
from egrpo.rewards.imagereward import IMAGEREWARD_FILES
from egrpo.rewards.loading import Needed, require_files
from egrpo.rewards.tiny import (
    IMAGE_SIZE,
)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "launch" / "configs" / "toy-egrpo.yaml"
UNREACHABLE_RAY = "127.0.0.1:1"  # nothing listens: a missed check fails to join (exit 3), never starts Ray
CHECK_SECONDS = 20.0  # the bound on a refused start; a start that reaches Ray's actors took 27 s and more
MODELS = ("clip", "pickscore", "aesthetic", "hpsv2", "imagereward")
FILE_TABLES: dict[str, tuple[Needed, ...]] = {
    "clip": CLIP_FILES,
    "pickscore": CLIP_FILES,
    "aesthetic": AESTHETIC_FILES,
    "hpsv2": HPS_FILES,
    "imagereward": IMAGEREWARD_FILES,
}
Damage = Callable[[Path], None]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny pipeline (a FLUX with a VAE, so every kind of component) and the five reward folders."""
    root = tmp_path_factory.mktemp("healthy")
    save_pipeline(build_flux_pipeline(), root / "pipeline", height=32, width=32)
    return {"pipeline": root / "pipeline", **save_reward_folders(root, MODELS)}


def damaged(healthy: dict[str, Path], name: str, damage: Damage, tmp_path: Path) -> Path:
    """A copy of the healthy folder `name`, damaged."""
    folder = tmp_path / f"broken-{name}"
    shutil.copytree(healthy[name], folder)
    damage(folder)
    return folder


def remove(relative: str) -> Damage:
    """Delete a file or folder under the damaged folder."""

    def damage(folder: Path) -> None:
        target = folder / relative
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return damage


def pipeline_class(name: str) -> Damage:
    """Rename the pipeline class in model_index.json."""

    def damage(folder: Path) -> None:
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))

    return damage


def grow_tokenizer(relative: str, cls: type[CLIPTokenizer] | type[BertTokenizer]) -> Damage:
    """Give the tokenizer under `relative` more ids than its text model's embedding rows: prompts holding the
    new tokens would index past the embedding table."""

    def damage(folder: Path) -> None:
        tokenizer = cls.from_pretrained(folder / relative)
        tokenizer.add_tokens([f"extra{i}" for i in range(4)])
        tokenizer.save_pretrained(folder / relative)

    return damage


def reward_overrides(model: str, folder: Path) -> list[str]:
    """--set overrides that make the toy recipe use `model` from `folder` (weight 0: scored, not trained)."""
    return [f"rewards.paths.{model}={folder}", f"rewards.weights.{REWARD_NAMES[model][0]}=0.0"]


def run_train(overrides: list[str], run_dir: Path) -> tuple[int, str, str, float]:
    """`egrpo train` on the toy recipe, on the Ray backend: (exit code, stdout, stderr, seconds)."""
    sets = ["runtime.backend=ray", f"runtime.address={UNREACHABLE_RAY}", f"run.dir={run_dir}", *overrides]
    command = [sys.executable, "-m", "egrpo.cli", "train", str(RECIPE)]
    for item in sets:
        command += ["--set", item]
    env = {**os.environ, "RAY_ADDRESS": UNREACHABLE_RAY}
    start = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - start


def assert_refused(overrides: list[str], key: str, folder: Path, detail: str, run_dir: Path) -> None:
    """The start is refused in seconds, with exit code 2 and one line naming `key`, `folder` and `detail`,
    and Ray was never reached."""
    code, out, err, seconds = run_train(overrides, run_dir)
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"egrpo: config error: {key}: "), line
    assert str(folder) in line and detail in line, line
    assert "Ray" not in out + err  # no "starting a local Ray", no "joining the Ray cluster"
    assert seconds < CHECK_SECONDS, f"took {seconds:.1f} s"
    assert not run_dir.exists()  # nothing was written either


# ------------------------------------------------------------------------------------ through the CLI


MODEL_CASES: dict[str, tuple[Damage, str]] = {
    "no-model-index": (remove("model_index.json"), "model_index.json does not exist"),
    "unsupported-pipeline": (
        pipeline_class("StableDiffusionXLPipeline"),
        "names a StableDiffusionXLPipeline",
    ),
    "missing-component": (remove("transformer"), "transformer does not exist"),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_a_broken_model_folder_stops_train_before_ray(
    healthy: dict[str, Path], tmp_path: Path, case: str
) -> None:
    damage, detail = MODEL_CASES[case]
    folder = damaged(healthy, "pipeline", damage, tmp_path)
    assert_refused([f"model.path={folder}"], "model.path", folder, detail, tmp_path / "runs")


REWARD_CASES: dict[str, tuple[str, Damage, str]] = {
    "clip-config": ("clip", remove("config.json"), "config.json does not exist"),
    "pickscore-tokenizer": ("pickscore", remove("tokenizer.json"), "has no tokenizer"),
    "aesthetic-clip-weights": ("aesthetic", remove("clip/model.safetensors"), "has no weights"),
    "hpsv2-checkpoint": ("hpsv2", remove("HPS_v2.1_compressed.pt"), "exactly one checkpoint file"),
    "imagereward-med-config": ("imagereward", remove("med_config.json"), "med_config.json does not exist"),
    "clip-tokenizer-too-big": ("clip", grow_tokenizer("", CLIPTokenizer), "vocab_size"),
    "imagereward-tokenizer-too-big": (
        "imagereward",
        grow_tokenizer("tokenizer", BertTokenizer),
        "vocab_size",
    ),
}


@pytest.mark.parametrize("case", REWARD_CASES)
def test_a_broken_reward_folder_stops_train_before_ray(
    healthy: dict[str, Path], tmp_path: Path, case: str
) -> None:
    model, damage, detail = REWARD_CASES[case]
    folder = damaged(healthy, model, damage, tmp_path)
    assert_refused(
        reward_overrides(model, folder), f"rewards.paths.{model}", folder, detail, tmp_path / "runs"
    )


# ------------------------------------------------------------------------------------ the checks directly


def test_healthy_folders_pass_the_checks(healthy: dict[str, Path]) -> None:
    assert check_pipeline_folder(healthy["pipeline"])["_class_name"] == "FluxPipeline"
    assert check_pipeline_folder(REPO / "egrpo" / "toyworld" / "checkpoint")["_class_name"] == "FluxPipeline"
    for model in MODELS:
        assert check_reward_folder(model, str(healthy[model])) == healthy[model]
    overrides = [f"model.path={healthy['pipeline']}"]
    for model in MODELS:
        overrides += reward_overrides(model, healthy[model])
    check_input_files(load_config(RECIPE, overrides))


def test_every_component_of_the_pipeline_is_checked(healthy: dict[str, Path], tmp_path: Path) -> None:
    index = json.loads((healthy["pipeline"] / "model_index.json").read_text())
    components = [name for name, spec in index.items() if not name.startswith("_") and spec != [None, None]]
    assert {"transformer", "vae", "scheduler", "text_encoder", "tokenizer_2"} <= set(components)
    for name in components:
        for file in sorted((healthy["pipeline"] / name).iterdir()):
            if file.name == "tokenizer_config.json":
                continue  # the vocabulary is in tokenizer.json
            folder = damaged(
                healthy, "pipeline", remove(f"{name}/{file.name}"), tmp_path / f"{name}-{file.name}"
            )
            with pytest.raises(FileNotFoundError, match=str(folder / name)):
                check_pipeline_folder(folder)


def test_the_policy_loads_through_the_same_check(healthy: dict[str, Path], tmp_path: Path) -> None:
    from egrpo.models.policy import FlowPolicy

    folder = damaged(healthy, "pipeline", remove("transformer"), tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{folder / 'transformer'} does not exist"):
        FlowPolicy.from_pretrained(folder)


@pytest.mark.parametrize("model", MODELS)
def test_every_declared_reward_file_is_checked(healthy: dict[str, Path], tmp_path: Path, model: str) -> None:
    """Removing any file a model's table finds makes check_reward_folder name the key and its folder."""
    for k, file in enumerate(require_files(healthy[model], FILE_TABLES[model])):
        relative = file.relative_to(healthy[model])
        folder = damaged(healthy, model, remove(str(relative)), tmp_path / str(k))
        with pytest.raises(
            FileNotFoundError, match=rf"^rewards\.paths\.{model}: .*{folder / relative.parent}"
        ):
            check_reward_folder(model, str(folder))


@pytest.mark.parametrize("model", MODELS)
def test_reward_loaders_read_only_the_declared_files(
    healthy: dict[str, Path], tmp_path: Path, model: str
) -> None:
    """A folder holding nothing but the files of the model's table loads and scores: the table is complete."""
    folder = tmp_path / model
    for file in require_files(healthy[model], FILE_TABLES[model]):
        target = folder / file.relative_to(healthy[model])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, target)
    check_reward_folder(model, str(folder))
    [reward] = build_reward_models(REWARD_NAMES[model], paths={model: str(folder)})
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    assert (
        score_all([reward], images, ["a red circle", "a blue square"])[REWARD_NAMES[model][0]]
        .isfinite()
        .all()
    )


def test_a_tokenizer_past_the_vocabulary_is_refused_by_the_loader_too(
    healthy: dict[str, Path], tmp_path: Path
) -> None:
    """Not only the CLI's check: the loader refuses it before scoring could raise an IndexError."""
    folder = damaged(healthy, "clip", grow_tokenizer("", CLIPTokenizer), tmp_path)
    with pytest.raises(
        ValueError, match=r"has ids up to \d+, but .*config\.json \(text_config\) gives the text"
    ):
        build_reward_models(["clip_score"], paths={"clip": str(folder)})


def test_imagereward_vocabulary_counts_the_tokens_blip_adds(healthy: dict[str, Path], tmp_path: Path) -> None:
    """bert-base-uncased's files without [DEC] and [ENC] fit a med_config.json whose vocab_size counts them
    (as ImageReward's 30522 + 2 = 30524 does), and not one that leaves them out."""
    folder = damaged(healthy, "imagereward", remove("tokenizer"), tmp_path)
    saved = BertTokenizer.from_pretrained(healthy["imagereward"] / "tokenizer")
    pieces = sorted((i, t) for t, i in saved.get_vocab().items() if t not in ("[DEC]", "[ENC]"))
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("".join(f"{t}\n" for _, t in pieces))
    med = json.loads((folder / "med_config.json").read_text())
    assert med["vocab_size"] == len(pieces) + 2
    check_reward_folder("imagereward", str(folder))
    (folder / "med_config.json").write_text(json.dumps({**med, "vocab_size": len(pieces)}))
    with pytest.raises(
        ValueError,
        match=rf"rewards\.paths\.imagereward: .* ids up to {len(pieces) + 1}, .*"
        rf"vocab_size {len(pieces)}",
    ):
        check_reward_folder("imagereward", str(folder))


def test_check_input_files_names_the_key_for_each_broken_input(
    healthy: dict[str, Path], tmp_path: Path
) -> None:
    """The in-process counterpart of the CLI tests, one message each, all on one line."""
    folder = damaged(healthy, "pipeline", remove("model_index.json"), tmp_path / "model")
    with pytest.raises(ConfigError, match=rf"^model\.path: no diffusers pipeline at {folder}: "):
        check_input_files(load_config(RECIPE, [f"model.path={folder}"]))
    folder = damaged(healthy, "hpsv2", remove("clip/config.json"), tmp_path / "hps")
    with pytest.raises(
        ConfigError, match=rf"^rewards\.paths\.hpsv2: {folder / 'clip' / 'config.json'} does not"
    ):
        check_input_files(load_config(RECIPE, reward_overrides("hpsv2", folder)))
