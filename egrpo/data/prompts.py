"""Prompt datasets and a seeded sampler that resumes exactly where a checkpoint left it.

A prompt spec is either "toy:train" / "toy:eval" (the fixed toy-world splits) or a file:

- `.txt`: one prompt per line (DanceGRPO's and MixGRPO's prompts.txt, Flow-GRPO's train.txt);
- `.jsonl`: one object per line with a "prompt" (or "caption" or "text") field;
- `.json`: a list whose items are prompt strings or such objects. This reads HPDv2's released files as they
  are: `benchmark/{anime,concept-art,paintings,photo}.json` are lists of strings, `test.json` and
  `train.json` lists of objects with a "prompt" field (plus image paths and preference labels, ignored).

Prompts come back stripped, in file order, each once: blank ones are skipped and repeats dropped (HPDv2's
train.json lists a prompt once per annotated image pair, which would otherwise weight it by its pair count).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from egrpo.toyworld.world import eval_prompts, train_prompts

TOY_SPLITS = {"toy:train": train_prompts, "toy:eval": eval_prompts}
PROMPT_FIELDS = ("prompt", "caption", "text")
FILE_SUFFIXES = (".txt", ".jsonl", ".json")


def load_prompts(spec: str) -> list[str]:
    """The prompts a spec names (see the module docstring); errors name the file and the line or item."""
    if spec in TOY_SPLITS:
        return TOY_SPLITS[spec]()
    if spec.startswith("toy:"):
        raise ValueError(f"unknown toy split {spec!r}; known: {list(TOY_SPLITS)}")
    path = Path(spec)
    if path.suffix not in FILE_SUFFIXES:
        raise ValueError(
            f"prompt spec {spec!r} is neither {' nor '.join(TOY_SPLITS)} nor a {', '.join(FILE_SUFFIXES)} file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        prompts = _json_prompts(path, text)
    elif path.suffix == ".jsonl":
        prompts = _jsonl_prompts(path, text.splitlines())
    else:
        prompts = text.splitlines()
    stripped = (p.strip() for p in prompts)
    prompts = list(dict.fromkeys(p for p in stripped if p))
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def _field(record: Any) -> str | None:
    """The prompt of a JSON object: its first string-valued field among PROMPT_FIELDS, else None."""
    if not isinstance(record, dict):
        return None
    return next((record[f] for f in PROMPT_FIELDS if isinstance(record.get(f), str)), None)


def _jsonl_prompts(path: Path, lines: list[str]) -> list[str]:
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        prompt = _field(record)
        if prompt is None:
            raise ValueError(
                f"{path}:{number}: expected an object with a string field {' or '.join(PROMPT_FIELDS)}"
            )
        prompts.append(prompt)
    return prompts


def _json_prompts(path: Path, text: str) -> list[str]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of prompts at the top level, got {type(items).__name__}")
    prompts = []
    for index, item in enumerate(items):
        prompt = item if isinstance(item, str) else _field(item)
        if prompt is None:
            raise ValueError(
                f"{path}[{index}]: expected a string or an object with a string field {' or '.join(PROMPT_FIELDS)}"
            )
        prompts.append(prompt)
    return prompts


class PromptSampler:
    """Draws prompts without replacement, one seeded shuffle per epoch, continuing into the next epoch as needed.

    The order of epoch e depends only on (seed, e), so the sampler's whole state is (seed, epoch, position)
    and a sampler restored from `state_dict()` continues the exact sequence the saved one would have drawn."""

    def __init__(self, prompts: list[str], seed: int) -> None:
        if not prompts:
            raise ValueError("PromptSampler needs at least one prompt")
        self.prompts = list(prompts)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        # A string seed is hashed with SHA-512 by `random`, so the order is the same in every process and run.
        order = list(range(len(self.prompts)))
        random.Random(f"egrpo-prompts:{self.seed}:{self.epoch}").shuffle(order)
        return order

    def next(self, n: int) -> list[str]:
        """The next n prompts of the sequence."""
        if n < 0:
            raise ValueError(f"cannot draw {n} prompts")
        drawn = []
        for _ in range(n):
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffle()
            drawn.append(self.prompts[self._order[self.position]])
            self.position += 1
        return drawn

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; `num_prompts` lets `load_state_dict` reject a different prompt list."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_prompts": len(self.prompts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_prompts"] != len(self.prompts):
            raise ValueError(
                f"sampler state is for {state['num_prompts']} prompts, but this sampler has {len(self.prompts)}"
            )
        if not 0 <= state["position"] <= len(self.prompts):
            raise ValueError(f"sampler state position {state['position']} is outside 0..{len(self.prompts)}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._shuffle()
