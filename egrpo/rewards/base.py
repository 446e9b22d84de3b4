"""The one reward interface, and a registry from reward names to the models that produce them.

A *reward model* scores a batch of images against their prompts and returns one or more named rewards
("toy_colour", later "pickscore", ...). The config names rewards, not models; `build_reward_models` loads each
model those rewards need exactly once, and `score_all` merges their outputs into one dict.

Each registered model declares the reward names it produces, so a name can be resolved to its model without
loading any weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch


class RewardModel(Protocol):
    names: tuple[str, ...]  # the reward names score() returns

    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) float in [0, 1] on any device -> {name: (B,) float32 CPU tensor}.

        Higher is better. A sample the model cannot score is NaN; the caller drops and counts those."""
        ...


# model name -> factory; a factory builds the model (loading weights, if any) when called.
REWARD_MODELS: dict[str, Callable[[], RewardModel]] = {}
# model name -> the reward names its score() returns, known without building the model.
REWARD_NAMES: dict[str, tuple[str, ...]] = {}


def register_reward_model(model: str, factory: Callable[[], RewardModel], names: Sequence[str]) -> None:
    """Add a model to the registry; each reward name must belong to exactly one model."""
    if model in REWARD_MODELS:
        raise ValueError(f"reward model {model!r} is already registered")
    taken = {name: owner for owner, owned in REWARD_NAMES.items() for name in owned}
    clashes = [f"{name!r} (from {taken[name]!r})" for name in names if name in taken]
    if clashes:
        raise ValueError(f"reward model {model!r} would redefine rewards {', '.join(clashes)}")
    REWARD_MODELS[model] = factory
    REWARD_NAMES[model] = tuple(names)


def _toy() -> RewardModel:
    # Imported here so that importing the registry does not import the toy world.
    from egrpo.toyworld.rewards import ToyReward

    return ToyReward()


register_reward_model("toy", _toy, ("toy_colour", "toy_shape", "toy_position"))


def reward_model_for(name: str) -> str:
    """The registered model that produces reward `name`."""
    for model, names in REWARD_NAMES.items():
        if name in names:
            return model
    known = sorted(n for names in REWARD_NAMES.values() for n in names)
    raise ValueError(f"unknown reward {name!r}; known rewards: {known}")


def build_reward_models(reward_names: Iterable[str]) -> list[RewardModel]:
    """Build each model that the named rewards need, once, in the order the rewards first name them."""
    models = dict.fromkeys(reward_model_for(name) for name in reward_names)
    return [REWARD_MODELS[model]() for model in models]


def score_all(
    models: Iterable[RewardModel], images: torch.Tensor, prompts: list[str]
) -> dict[str, torch.Tensor]:
    """Every reward of every model, as one dict of (B,) float32 CPU tensors; NaNs are kept for the caller.

    Checks each model's output against its declared names and the batch size, so a broken model fails here
    with its name rather than later as a shape error in the advantage computation."""
    batch = images.shape[0]
    merged: dict[str, torch.Tensor] = {}
    for model in models:
        scores = model.score(images, prompts)
        if set(scores) != set(model.names):
            raise ValueError(
                f"{type(model).__name__} returned rewards {sorted(scores)}, declared {list(model.names)}"
            )
        for name, value in scores.items():
            if value.shape != (batch,):
                raise ValueError(f"reward {name!r} has shape {tuple(value.shape)}, expected ({batch},)")
            if name in merged:
                raise ValueError(f"reward {name!r} is produced by more than one model")
            merged[name] = value.detach().to("cpu", torch.float32)
    return merged
