"""The one reward interface, and a registry from reward names to the models that produce them.

A *reward model* scores a batch of images against their prompts and returns one or more named rewards
("toy_colour", "pickscore", ...). The config names rewards, not models; `build_reward_models` loads each
model those rewards need exactly once, and `score_all` merges their outputs into one dict. Models score
float images in [0, 1]; `score_all` also takes the uint8 images rollouts carry (egrpo.images) and converts
them, once, for all its models.

Each registered model declares the reward names it produces, so a name can be resolved to its model without
loading any weights. A model that needs weights reads them from a local path, given per *model* name in the
config's `rewards.paths` (e.g. `rewards.paths.pickscore: /models/PickScore_v1`); each model's module documents
the layout it expects at that path. Nothing is downloaded.

Registered models (model: rewards, scale; higher is better for all):

    toy          toy_colour, toy_shape, toy_position: [0, 1]         egrpo.toyworld.rewards
    clip         clip_score: cosine, ~0.15-0.35 for CLIP ViT-L/14    egrpo.rewards.clip
    pickscore    pickscore: 100 x cosine, ~18-23                     egrpo.rewards.clip
    aesthetic    aesthetic: LAION aesthetic rating, 1-10, mostly 4-7 egrpo.rewards.aesthetic
    hpsv2        hpsv2: cosine, ~0.25-0.35 (FLUX.1-dev ~0.31)        egrpo.rewards.hps
    imagereward  imagereward: standardised, mostly -2..2             egrpo.rewards.imagereward
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from egrpo.batch import Batch
from egrpo.images import to_float_images

# The config key that maps model names to local weights; errors name it so the user knows what to set.
PATHS_KEY = "rewards.paths"


class RewardModel(Protocol):
    names: tuple[str, ...]  # the reward names score() returns

    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) float in [0, 1] on any device -> {name: (B,) float32 CPU tensor}.

        Higher is better. A sample the model cannot score is NaN; the caller drops and counts those."""
        ...


# factory(path, device): builds the model, loading its weights from `path` (None when the config gives none)
# onto `device`.
RewardFactory = Callable[[str | None, str], RewardModel]

# model name -> factory; a factory builds the model (loading weights, if any) when called.
REWARD_MODELS: dict[str, RewardFactory] = {}
# model name -> the reward names its score() returns, known without building the model.
REWARD_NAMES: dict[str, tuple[str, ...]] = {}
# models that load local weights, so need `rewards.paths.<model>` (checked before anything starts)
NEEDS_WEIGHTS: set[str] = set()
# check(folder): raises FileNotFoundError or ValueError, naming the file, when the model's loader would fail
# on `folder` (a file it reads is missing, its tokenizer does not fit its text model); reads no weights.
FolderCheck = Callable[[Path], None]
# model name -> its pre-flight check (`check_reward_folder`), defined beside the model's loader.
REWARD_CHECKS: dict[str, FolderCheck] = {}


def register_reward_model(
    model: str,
    factory: RewardFactory,
    names: Sequence[str],
    needs_weights: bool = True,
    check: FolderCheck | None = None,
) -> None:
    """Add a model to the registry; each reward name must belong to exactly one model. `check` is the cheap
    pre-flight check of the model's folder that `check_reward_folder` runs before anything starts."""
    if model in REWARD_MODELS:
        raise ValueError(f"reward model {model!r} is already registered")
    taken = {name: owner for owner, owned in REWARD_NAMES.items() for name in owned}
    clashes = [f"{name!r} (from {taken[name]!r})" for name in names if name in taken]
    if clashes:
        raise ValueError(f"reward model {model!r} would redefine rewards {', '.join(clashes)}")
    REWARD_MODELS[model] = factory
    REWARD_NAMES[model] = tuple(names)
    if needs_weights:
        NEEDS_WEIGHTS.add(model)
    if check is not None:
        REWARD_CHECKS[model] = check


def weights_path(model: str, path: str | None) -> Path:
    """The local path of `model`'s weights, checked to be given and to exist."""
    if not path:
        raise ValueError(
            f"reward model {model!r} needs local weights: set {PATHS_KEY}.{model} "
            f"(the expected layout is documented in egrpo/rewards/)"
        )
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"{PATHS_KEY}.{model}: {resolved} does not exist")
    return resolved


def check_reward_folder(model: str, path: str | None) -> Path:
    """Everything about `model`'s weights that can be known without loading them, checked in seconds before
    any model or actor starts: the path is given and exists (`weights_path`), and the model's registered check
    passes (each file its loader reads is there; its tokenizer's ids fit its text model's vocabulary). Errors
    (FileNotFoundError, ValueError) start with the config key, `rewards.paths.<model>`; returns the path."""
    folder = weights_path(model, path)
    check = REWARD_CHECKS.get(model)
    if check is None:
        return folder
    try:
        check(folder)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{PATHS_KEY}.{model}: {e}") from e
    except (OSError, ValueError) as e:  # e.g. a config.json transformers cannot parse
        raise ValueError(f"{PATHS_KEY}.{model}: {e}") from e
    return folder


def _lazy(target: str) -> RewardFactory:
    """A factory that imports `module:function` only when called, so importing the registry stays cheap."""
    module, _, function = target.partition(":")

    def factory(path: str | None, device: str) -> RewardModel:
        return getattr(importlib.import_module(module), function)(path, device)

    return factory


def _lazy_check(target: str) -> FolderCheck:
    """A folder check that imports `module:function` only when called, as `_lazy` does for factories."""
    module, _, function = target.partition(":")

    def check(folder: Path) -> None:
        getattr(importlib.import_module(module), function)(folder)

    return check


def _toy(path: str | None, device: str) -> RewardModel:
    """The toy world's programmatic rewards: no weights, CPU only, so both arguments are ignored."""
    from egrpo.toyworld.rewards import ToyReward

    return ToyReward()


register_reward_model("toy", _toy, ("toy_colour", "toy_shape", "toy_position"), needs_weights=False)
# Each model with weights also registers its folder check; the files each one reads are declared beside its
# loader: CLIP_FILES (clip, pickscore), AESTHETIC_FILES, HPS_FILES, IMAGEREWARD_FILES.
register_reward_model("clip", _lazy("egrpo.rewards.clip:load_clip_score"), ("clip_score",),
                      check=_lazy_check("egrpo.rewards.clip:check_clip_folder"))
register_reward_model("pickscore", _lazy("egrpo.rewards.clip:load_pickscore"), ("pickscore",),
                      check=_lazy_check("egrpo.rewards.clip:check_clip_folder"))
register_reward_model("aesthetic", _lazy("egrpo.rewards.aesthetic:load_aesthetic"), ("aesthetic",),
                      check=_lazy_check("egrpo.rewards.aesthetic:check_aesthetic_folder"))
register_reward_model("hpsv2", _lazy("egrpo.rewards.hps:load_hpsv2"), ("hpsv2",),
                      check=_lazy_check("egrpo.rewards.hps:check_hps_folder"))
register_reward_model("imagereward", _lazy("egrpo.rewards.imagereward:load_imagereward"), ("imagereward",),
                      check=_lazy_check("egrpo.rewards.imagereward:check_imagereward_folder"))


def reward_model_for(name: str) -> str:
    """The registered model that produces reward `name`."""
    for model, names in REWARD_NAMES.items():
        if name in names:
            return model
    known = sorted(n for names in REWARD_NAMES.values() for n in names)
    raise ValueError(f"unknown reward {name!r}; known rewards: {known}")


def build_reward_models(
    reward_names: Iterable[str], paths: Mapping[str, str] | None = None, device: str = "cpu"
) -> list[RewardModel]:
    """Build each model that the named rewards need, once, in the order the rewards first name them.

    `paths` maps model names (not reward names) to local weights; entries for models no reward needs are
    ignored, but a name that is no registered model is an error (a likely typo, e.g. a reward name)."""
    paths = dict(paths or {})
    unknown = sorted(set(paths) - set(REWARD_MODELS))
    if unknown:
        raise ValueError(
            f"{PATHS_KEY} names unknown reward models {unknown}; known models: {sorted(REWARD_MODELS)}"
        )
    models = dict.fromkeys(reward_model_for(name) for name in reward_names)
    return [REWARD_MODELS[model](paths.get(model), device) for model in models]


def score_all(
    models: Iterable[RewardModel], images: torch.Tensor, prompts: list[str]
) -> dict[str, torch.Tensor]:
    """Every reward of every model, as one dict of (B,) float32 CPU tensors; NaNs are kept for the caller.
    `images` (B, 3, H, W) are uint8 (x / 255 is scored) or float in [0, 1].

    Checks each model's output against its declared names and the batch size, so a broken model fails here
    with its name rather than later as a shape error in the advantage computation."""
    images = to_float_images(images)
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


def score_samples(models: Iterable[RewardModel], samples: Batch) -> dict[str, torch.Tensor]:
    """`score_all` on a rollout's samples (egrpo.sampling.rollout), NaN where a sample's decoded image was
    not finite: its uint8 image no longer shows that, and a NaN reward keeps the sample out of training."""
    rewards = score_all(models, samples["images"], samples["prompt"])
    unscorable = ~samples["image_finite"]
    return {name: value.masked_fill(unscorable, float("nan")) for name, value in rewards.items()}
