"""Prompt datasets and a seeded sampler that resumes exactly where a checkpoint left it.

A prompt spec is either "toy:train" / "toy:eval" (the fixed toy-world splits) or a file: a .txt file with
one prompt per line, or a .jsonl file whose lines are objects with a "prompt" (or "caption" or "text") field.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from egrpo.toyworld.world import eval_prompts, train_prompts

TOY_SPLITS = {"toy:train": train_prompts, "toy:eval": eval_prompts}
JSONL_FIELDS = ("prompt", "caption", "text")


def load_prompts(spec: str) -> list[str]:
    """The prompts a spec names, in file order; errors name the file (and line, for JSONL)."""
    if spec in TOY_SPLITS:
        return TOY_SPLITS[spec]()
    if spec.startswith("toy:"):
        raise ValueError(f"unknown toy split {spec!r}; known: {list(TOY_SPLITS)}")
    path = Path(spec)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(
            f"prompt spec {spec!r} is neither {' nor '.join(TOY_SPLITS)} nor a .txt or .jsonl file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = _jsonl_prompts(path, lines) if path.suffix == ".jsonl" else [ln.strip() for ln in lines]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def _jsonl_prompts(path: Path, lines: list[str]) -> list[str]:
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        text = (
            next((record[f] for f in JSONL_FIELDS if f in record), None) if isinstance(record, dict) else None
        )
        if not isinstance(text, str):
            raise ValueError(
                f"{path}:{number}: expected an object with a string field {' or '.join(JSONL_FIELDS)}"
            )
        prompts.append(text.strip())
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
