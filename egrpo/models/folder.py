"""What a diffusers pipeline folder must hold for `FlowPolicy.from_pretrained`, checked without loading it.

Light on purpose (json and pathlib, no diffusers or torch): the CLI runs `check_pipeline_folder` on
model.path before Ray or any model starts, so a folder that is not a pipeline, holds one egrpo does not
support, or lacks a component costs one line and seconds instead of a traceback from every actor that tries
to load it.
`FlowPolicy.from_pretrained` runs the same check first, so the two cannot disagree.

A pipeline folder (what `DiffusionPipeline.save_pretrained` writes, and what a hub download holds):

    model_index.json   {"_class_name": "FluxPipeline", "<component>": [library, class] or [null, null], ...}
    <component>/       one folder per non-null component: a model's config.json and weights, a scheduler's
                       scheduler_config.json, a tokenizer's vocabulary files, a processor's
                       preprocessor_config.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from egrpo.models.families import PIPELINE_FAMILIES

# The weights files each library's from_pretrained reads from a model component's folder (no variant: egrpo
# loads none), a single file or a shard index.
WEIGHTS_FILES: dict[str, tuple[str, ...]] = {
    "diffusers": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.bin.index.json",
    ),
    "transformers": (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ),
}
# A tokenizer's vocabulary, in the formats transformers' tokenizers read (CLIP's BPE, T5's SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model", "vocab.txt")


def component_files(folder: Path, library: str, class_name: str) -> list[Path]:
    """The files a pipeline component of class `class_name` (from `library`) is loaded from, found (not read)
    in `folder`; FileNotFoundError naming the first one missing. The kind is read off the class name, as the
    libraries name their classes: *Scheduler, *Tokenizer[Fast], *ImageProcessor / *FeatureExtractor, else a
    model (config.json and weights)."""
    what = f"the {library} {class_name} named in model_index.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist ({what})")
    if class_name.endswith("Scheduler"):
        return [_require(folder / "scheduler_config.json", what)]
    if "Tokenizer" in class_name:
        return [_first(folder, TOKENIZER_FILES, f"a tokenizer's vocabulary, for {what}")]
    if class_name.endswith(("ImageProcessor", "FeatureExtractor")):
        return [_require(folder / "preprocessor_config.json", what)]
    config = _require(folder / "config.json", what)
    names = WEIGHTS_FILES.get(library, WEIGHTS_FILES["transformers"] + WEIGHTS_FILES["diffusers"])
    return [config, _first(folder, names, f"the weights of {what}")]


def check_pipeline_folder(path: str | Path) -> dict[str, Any]:
    """The parsed model_index.json of the pipeline folder at `path`, once the folder is one egrpo can load:
    the index exists and is JSON, names a pipeline in PIPELINE_FAMILIES, and every non-null component's
    folder holds the files it is loaded from (`component_files`). Reads no weights. FileNotFoundError for a
    missing file, ValueError for a wrong one; each message is one line naming the file."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (a local diffusers pipeline)")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"no diffusers pipeline at {path}: {index_file} does not exist")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index_file} is not valid JSON: {e}") from None
    if not isinstance(index, dict):
        raise ValueError(f"{index_file} is not a diffusers model_index.json (not a JSON object)")
    name = index.get("_class_name")
    if name not in PIPELINE_FAMILIES:
        supported = ", ".join(sorted(PIPELINE_FAMILIES))
        raise ValueError(f"{index_file} names a {name}; egrpo supports {supported}")
    for component, spec in index.items():
        # metadata (_class_name, ...), a component saved as absent ([null, null]) or a config value: no folder
        if component.startswith("_") or not (
            isinstance(spec, list) and len(spec) == 2 and all(isinstance(part, str) for part in spec)
        ):
            continue
        component_files(path / component, *spec)
    return index


def _require(file: Path, what: str) -> Path:
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist ({what})")
    return file


def _first(folder: Path, names: tuple[str, ...], what: str) -> Path:
    """The first of `names` in `folder`."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has none of {', '.join(names)} ({what})")
