"""Loading reward weights from local files and folders, with errors that name the file and what is wrong.

transformers' own errors for a bad local folder are often about the model hub (it falls back to a download
that is disabled offline) and it only warns about missing weights, leaving them random. These helpers check
first and fail with the path instead.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

ModelT = TypeVar("ModelT", bound=PreTrainedModel)
ConfigT = TypeVar("ConfigT", bound=PretrainedConfig)

# Suffixes of single-file checkpoints: safetensors, or pickles read with torch.load(weights_only=True).
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# The weights files transformers' from_pretrained reads from a model folder (one file, or a shard index).
TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# The files a tokenizer's vocabulary is read from; any one is enough (vocab.json also needs merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")


def require_file(path: Path, what: str) -> Path:
    """`path`, which must exist; `what` says what it is for the error."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist ({what})")
    return path


def tokenizer_file(folder: Path) -> Path:
    """The file `load_tokenizer` reads `folder`'s vocabulary from (see TOKENIZER_FILES), found without reading
    it, so a folder without one fails with its path rather than with transformers' hub-download error."""
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            if name == "vocab.json":  # tokenizer.json, first in the list, would hold the merges too
                require_file(folder / "merges.txt", "a BPE tokenizer's vocab.json needs its merges.txt")
            return folder / name
    raise FileNotFoundError(
        f"{folder} has no tokenizer (tokenizer.json, vocab.json + merges.txt, or vocab.txt): "
        f"copy the tokenizer files of the model's base checkpoint into it"
    )


def weights_file(folder: Path) -> Path:
    """The weights file transformers' from_pretrained reads in `folder` (see TRANSFORMERS_WEIGHTS), found
    without reading it: transformers would otherwise fail with a hub-download error naming no path."""
    for name in TRANSFORMERS_WEIGHTS:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{folder} has no weights ({' or '.join(TRANSFORMERS_WEIGHTS)})")


@dataclass(frozen=True)
class Needed:
    """One file a reward loader reads, relative to the model's `rewards.paths` entry. Each loader module
    declares its model's list of these beside its loader, and both the loader and the pre-flight check
    (`require_files`) find them the same way, with the helpers here, so the two cannot disagree.

    kind: "config" (`under`/config.json), "tokenizer" (TOKENIZER_FILES in `under`), "weights"
    (TRANSFORMERS_WEIGHTS in `under`), "checkpoint" (the one CHECKPOINT_SUFFIXES file in `under`) or "file"
    (`under`/`name`); `what` says what the file is for, in the error."""

    kind: Literal["config", "tokenizer", "weights", "checkpoint", "file"]
    under: str = ""
    name: str = ""
    what: str = ""

    def find(self, root: Path) -> Path:
        """The file under `root`; FileNotFoundError naming the missing path when it is not there."""
        folder = root / self.under
        if not folder.is_dir():
            what = self.what or f"the {self.kind}"
            raise FileNotFoundError(f"{folder} is not a folder (it should hold {what})")
        if self.kind == "config":
            return require_file(folder / "config.json", "a transformers model folder needs its config.json")
        if self.kind == "tokenizer":
            return tokenizer_file(folder)
        if self.kind == "weights":
            return weights_file(folder)
        if self.kind == "checkpoint":
            return single_checkpoint(folder)
        return require_file(folder / self.name, self.what)


def require_files(root: Path, needed: Iterable[Needed]) -> list[Path]:
    """The files a loader reads under `root`, each found (not read) in turn; the first missing one raises
    FileNotFoundError naming it. Cheap (no weights are read), so it runs before anything loads."""
    return [item.find(root) for item in needed]


def check_vocabulary(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, tokenizer_folder: Path, config: str
) -> None:
    """Refuse a tokenizer that can produce ids at or past `vocab_size`, the text model's embedding rows (read
    from `config`, named in the error): such an id would crash scoring with an IndexError in the embedding
    (on a GPU, a device-side assert), long after everything started."""
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= vocab_size:
        raise ValueError(
            f"the tokenizer in {tokenizer_folder} has ids up to {top}, but {config} gives the text model "
            f"vocab_size {vocab_size}: use the tokenizer files of the model's own checkpoint"
        )


def load_checkpoint_file(file: Path) -> dict:
    """A checkpoint file's contents on the CPU: a safetensors file, or a pickle read with weights_only=True
    (which refuses arbitrary code, so a file from the internet cannot run anything when loaded)."""
    require_file(file, "checkpoint")
    if file.suffix == ".safetensors":
        return load_file(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # truncated, or objects it refuses to load
        raise ValueError(f"{file} is not a readable torch checkpoint: {e}") from e


def single_checkpoint(folder: Path) -> Path:
    """The one checkpoint file directly in `folder` (see CHECKPOINT_SUFFIXES)."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(found) != 1:
        names = [p.name for p in found] or "none"
        raise FileNotFoundError(
            f"{folder} must hold exactly one checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}), "
            f"found {names}"
        )
    return found[0]


def load_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor], file: Path) -> None:
    """Load `state` into `module` strictly; on any missing, unexpected or wrongly shaped key, raise an error
    naming `file` and the first few offending keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(value.shape)})"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = [
        f"{label}: {_some(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        raise ValueError(f"{file} does not fit {type(module).__name__}: {'; '.join(problems)}")
    module.load_state_dict(state)


def load_config(cls: type[ConfigT], folder: Path) -> ConfigT:
    """`cls.from_pretrained(folder)`, failing with the path when the folder has no config.json."""
    require_file(folder / "config.json", "a transformers model folder needs its config.json")
    return cls.from_pretrained(folder)


def load_pretrained(
    cls: type[ModelT], folder: Path, device: str, config: PretrainedConfig | None = None
) -> ModelT:
    """`cls.from_pretrained(folder)` in eval mode on `device`, refusing missing or wrongly shaped weights
    (transformers would leave those randomly initialised with a warning). Weights in the folder that the model
    does not use are allowed: a vision-only model loads from a full CLIP folder."""
    if config is None:
        config = load_config(cls.config_class, folder)
    weights_file(folder)
    model, info = cls.from_pretrained(
        folder, config=config, output_loading_info=True, ignore_mismatched_sizes=True
    )
    wrong = [f"{key} {tuple(found)} (expected {tuple(want)})" for key, found, want in info["mismatched_keys"]]
    problems = [
        f"{label}: {_some(sorted(keys))}"
        for label, keys in (("missing", info["missing_keys"]), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        raise ValueError(f"the weights in {folder} do not fit its config.json: {'; '.join(problems)}")
    return model.to(device).eval()


def load_tokenizer(
    folder: Path, cls: type[PreTrainedTokenizerBase] | type[AutoTokenizer] = AutoTokenizer
) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `folder` (tokenizer.json, or vocab files such as vocab.json + merges.txt), as
    `cls`. Give the class when it is known: AutoTokenizer infers it from tokenizer_config.json or config.json,
    and bert-base-uncased's tokenizer files, for one, name no class, so without config.json they load as a
    generic tokenizer with no pad token."""
    tokenizer_file(folder)
    return cls.from_pretrained(folder)


def _some(keys: list[str], shown: int = 4) -> str:
    """The first `shown` keys, and how many more there are."""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
