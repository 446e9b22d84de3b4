"""Reward models on tiny twins saved in the released layouts and loaded through the registry, as real weights
are: shapes, determinism, batch-order consistency, NaN handling, each score against its definition computed by
hand, the open_clip -> transformers conversion of HPSv2 weights, and the errors for missing or bad weights."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import BertTokenizer, BlipTextModel, BlipVisionModel, CLIPModel, CLIPTokenizer

from egrpo.rewards.aesthetic import ScoreHead
from egrpo.rewards.base import RewardModel, build_reward_models, reward_model_for, score_all
from egrpo.rewards.clip import CLIP_MEAN, CLIP_STD, ImageTransform
from egrpo.rewards.tiny import (
    IMAGE_SIZE,
    build_tiny_clip,
    build_tiny_imagereward,
    save_clip_folder,
    save_tiny_aesthetic,
    save_tiny_clip,
)

PROMPTS = [
    "a red circle",
    "a blue square in the top left",
    "a green triangle",
    "a yellow circle at the bottom",
]
MODELS = ("clip", "pickscore", "aesthetic", "hpsv2", "imagereward")
REWARDS = ("clip_score", "pickscore", "aesthetic", "hpsv2", "imagereward")


def to_open_clip(model: CLIPModel) -> dict[str, torch.Tensor]:
    """The inverse of egrpo's key map, written out independently: a transformers CLIPModel's weights under
    open_clip's names, as HPSv2 saves them."""
    state = model.state_dict()
    out = {
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": state["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": state["vision_model.post_layernorm.bias"],
        "visual.proj": state["visual_projection.weight"].t(),
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].t(),
        "logit_scale": state["logit_scale"],
    }
    towers = (
        ("vision_model.", "visual.", model.config.vision_config.num_hidden_layers),
        ("text_model.", "", model.config.text_config.num_hidden_layers),
    )
    for hf, oc, layers in towers:
        for i in range(layers):
            src, dst = f"{hf}encoder.layers.{i}.", f"{oc}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{dst}ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
                out[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
                out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                    [state[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"]
                )
                out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
                out[f"{dst}mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
                out[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return {key: value.clone() for key, value in out.items()}


def save_hps(folder: Path, model: CLIPModel, state: dict[str, torch.Tensor] | None = None) -> Path:
    """An `hpsv2` folder: the CLIP folder's files in clip/ and the open_clip weights wrapped like the released
    training checkpoint."""
    file = folder / "HPS_v2.1_compressed.pt"
    torch.save({"epoch": 1, "state_dict": to_open_clip(model) if state is None else state}, file)
    return file


def to_blip(vision: BlipVisionModel, text: BlipTextModel, head: ScoreHead) -> dict[str, torch.Tensor]:
    """The inverse of egrpo's BLIP key map, written out independently: ImageReward.pt's names, plus the unused
    keys the released file also holds (BLIP's contrastive projections, the text position_ids buffer)."""
    v = vision.state_dict()
    out = {
        "blip.visual_encoder.cls_token": v["embeddings.class_embedding"],
        "blip.visual_encoder.pos_embed": v["embeddings.position_embedding"],
        "blip.visual_encoder.patch_embed.proj.weight": v["embeddings.patch_embedding.weight"],
        "blip.visual_encoder.patch_embed.proj.bias": v["embeddings.patch_embedding.bias"],
        "blip.visual_encoder.norm.weight": v["post_layernorm.weight"],
        "blip.visual_encoder.norm.bias": v["post_layernorm.bias"],
        "blip.vision_proj.weight": torch.zeros(4, vision.config.hidden_size),
        "blip.text_proj.weight": torch.zeros(4, text.config.hidden_size),
        "blip.text_encoder.embeddings.position_ids": torch.arange(text.config.max_position_embeddings)[None],
    }
    for i in range(vision.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"blip.visual_encoder.blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}norm1.{kind}"] = v[f"{src}layer_norm1.{kind}"]
            out[f"{dst}attn.qkv.{kind}"] = v[f"{src}self_attn.qkv.{kind}"]
            out[f"{dst}attn.proj.{kind}"] = v[f"{src}self_attn.projection.{kind}"]
            out[f"{dst}norm2.{kind}"] = v[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.fc1.{kind}"] = v[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.fc2.{kind}"] = v[f"{src}mlp.fc2.{kind}"]
    out.update({f"blip.text_encoder.{k}": t for k, t in text.state_dict().items()})
    out.update({f"mlp.{k}": t for k, t in head.state_dict().items()})
    return {key: value.clone() for key, value in out.items()}


def save_imagereward(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """An `imagereward` folder as THUDM/ImageReward ships it; returns the checkpoint's state dict."""
    vision, text, head, tokenizer, med = build_tiny_imagereward(seed)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_blip(vision, text, head)
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med))
    tokenizer.save_pretrained(folder / "tokenizer")
    return state


@torch.no_grad()
def imagereward_by_hand(
    state: dict[str, torch.Tensor], folder: Path, pixels: torch.Tensor, prompts: list[str]
):
    """ImageReward computed from its checkpoint as Salesforce BLIP's modules do, written with torch functions:
    a pre-norm ViT (LayerNorm eps 1e-6, 64-wide heads, final norm on all tokens), then BERT (post-norm, eps
    1e-12) with bidirectional self-attention and cross-attention to the image tokens, the [CLS] feature
    through the linear head, standardised."""

    def w(key: str) -> torch.Tensor:
        return state[key]

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None):
        b, n, d = q.shape
        q, k, v = (x.reshape(b, -1, heads, d // heads).transpose(1, 2) for x in (q, k, v))
        logits = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)

    vit = "blip.visual_encoder."
    patch = w(f"{vit}patch_embed.proj.weight")
    x = F.conv2d(normalise(pixels), patch, w(f"{vit}patch_embed.proj.bias"), stride=patch.shape[-1])
    x = torch.cat([w(f"{vit}cls_token").expand(len(x), 1, -1), x.flatten(2).transpose(1, 2)], 1) + w(
        f"{vit}pos_embed"
    )
    width, blocks = x.shape[-1], sum(1 for k in state if k.startswith(vit) and k.endswith("norm1.weight"))
    for i in range(blocks):
        p = f"{vit}blocks.{i}."
        h = F.layer_norm(x, (width,), w(f"{p}norm1.weight"), w(f"{p}norm1.bias"), 1e-6)
        q, k, v = F.linear(h, w(f"{p}attn.qkv.weight"), w(f"{p}attn.qkv.bias")).chunk(3, -1)
        x = x + F.linear(
            attention(q, k, v, width // 64, None), w(f"{p}attn.proj.weight"), w(f"{p}attn.proj.bias")
        )
        h = F.layer_norm(x, (width,), w(f"{p}norm2.weight"), w(f"{p}norm2.bias"), 1e-6)
        h = F.linear(
            F.gelu(F.linear(h, w(f"{p}mlp.fc1.weight"), w(f"{p}mlp.fc1.bias"))), w(f"{p}mlp.fc2.weight")
        )
        x = x + h + w(f"{p}mlp.fc2.bias")
    image = F.layer_norm(x, (width,), w(f"{vit}norm.weight"), w(f"{vit}norm.bias"), 1e-6)

    med = json.loads((folder / "med_config.json").read_text())
    tokens = BertTokenizer.from_pretrained(folder / "tokenizer")(
        prompts, padding="max_length", max_length=35, truncation=True, return_tensors="pt"
    )
    bert, dim, heads = "blip.text_encoder.", med["hidden_size"], med["num_attention_heads"]

    def norm(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.layer_norm(x, (dim,), w(f"{p}LayerNorm.weight"), w(f"{p}LayerNorm.bias"), 1e-12)

    def linear(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.linear(x, w(f"{p}weight"), w(f"{p}bias"))

    y = w(f"{bert}embeddings.word_embeddings.weight")[tokens["input_ids"]]
    y = norm(y + w(f"{bert}embeddings.position_embeddings.weight")[: y.shape[1]], f"{bert}embeddings.")
    for i in range(med["num_hidden_layers"]):
        p = f"{bert}encoder.layer.{i}."
        for part, source, mask in (
            ("attention", y, tokens["attention_mask"].bool()),
            ("crossattention", image, None),
        ):
            s = f"{p}{part}.self."
            out = attention(
                linear(y, f"{s}query."), linear(source, f"{s}key."), linear(source, f"{s}value."), heads, mask
            )
            y = norm(linear(out, f"{p}{part}.output.dense.") + y, f"{p}{part}.output.")
        y = norm(linear(F.gelu(linear(y, f"{p}intermediate.dense.")), f"{p}output.dense.") + y, f"{p}output.")
    r = y[:, 0]
    for layer in (0, 2, 4, 6, 7):
        r = linear(r, f"mlp.layers.{layer}.")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def save_reward_folders(root: Path, models: tuple[str, ...]) -> dict[str, Path]:
    """A tiny folder, in its release layout, for each of `models` (clip and pickscore share the CLIP layout);
    model k gets seed k."""
    for seed, model in enumerate(models):
        folder = root / model
        if model in ("clip", "pickscore"):
            save_tiny_clip(folder, seed=seed)
        elif model == "aesthetic":
            save_tiny_aesthetic(folder, seed=seed)
        elif model == "hpsv2":
            hps_model, tokenizer = build_tiny_clip(seed=seed)
            save_clip_folder(hps_model, tokenizer, folder / "clip")
            save_hps(folder, hps_model)
        else:
            save_imagereward(folder, seed=seed)
    return {model: root / model for model in models}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    saved = save_reward_folders(tmp_path_factory.mktemp("rewards"), ("clip", "aesthetic", "hpsv2", "imagereward"))
    return {m: saved["clip" if m == "pickscore" else m] for m in MODELS}


@pytest.fixture(scope="module")
def models(folders: dict[str, Path]) -> dict[str, RewardModel]:
    built = build_reward_models(REWARDS, paths={m: str(p) for m, p in folders.items()}, device="cpu")
    return {reward: model for reward, model in zip(REWARDS, built, strict=True)}


def images(batch: int = 4, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@torch.no_grad()
def cosine_by_hand(model: CLIPModel, folder: Path, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Cosine of CLIP's projected pooled image and text features, from the towers directly, with the tokenizer
    saved in `folder`."""
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    image = model.visual_projection(model.vision_model(pixel_values=normalise(pixels)).pooler_output)
    text = model.text_projection(model.text_model(**tokens).pooler_output)
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)


def test_registry_resolves_rewards_to_models() -> None:
    assert [reward_model_for(r) for r in REWARDS] == list(MODELS)
    toy = build_reward_models(["toy_colour", "toy_shape"], paths={"clip": "/nowhere"}, device="cpu")
    assert len(toy) == 1 and toy[0].names == ("toy_colour", "toy_shape", "toy_position")


def test_unknown_model_in_paths_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"rewards\.paths names unknown reward models \['clip_score'\]"):
        build_reward_models(["toy_colour"], paths={"clip_score": "/x"})


@pytest.mark.parametrize("model", MODELS)
def test_missing_path_names_the_config_key(model: str) -> None:
    reward = REWARDS[MODELS.index(model)]
    with pytest.raises(ValueError, match=rf"set rewards\.paths\.{model}\b"):
        build_reward_models([reward], paths={})


@pytest.mark.parametrize("model", MODELS)
def test_nonexistent_path_names_it(model: str, tmp_path: Path) -> None:
    reward = REWARDS[MODELS.index(model)]
    missing = tmp_path / "not-there"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_reward_models([reward], paths={model: str(missing)})


@pytest.mark.parametrize("reward", REWARDS)
def test_scores_are_deterministic_and_follow_the_batch_order(
    models: dict[str, RewardModel], reward: str
) -> None:
    batch = images()
    first = score_all([models[reward]], batch, PROMPTS)[reward]
    again = score_all([models[reward]], batch, PROMPTS)[reward]
    assert first.shape == (4,) and first.dtype == torch.float32 and first.isfinite().all()
    assert torch.equal(first, again)
    order = [2, 0, 3, 1]
    permuted = score_all([models[reward]], batch[order], [PROMPTS[i] for i in order])[reward]
    torch.testing.assert_close(permuted, first[order], rtol=0, atol=1e-5)


@pytest.mark.parametrize("reward", REWARDS)
def test_a_non_finite_image_scores_nan_and_leaves_the_rest(
    models: dict[str, RewardModel], reward: str
) -> None:
    batch = images()
    clean = models[reward].score(batch, PROMPTS)[reward]
    batch[1, 0, 3, 4] = float("nan")
    batch[2, 1, 0, 0] = float("inf")
    scores = models[reward].score(batch, PROMPTS)[reward]
    assert scores[1:3].isnan().all()
    torch.testing.assert_close(scores[[0, 3]], clean[[0, 3]], rtol=0, atol=1e-5)


def test_clip_score_and_pickscore_are_the_cosine_and_its_scaled_logit(
    models: dict[str, RewardModel], folders: dict[str, Path]
) -> None:
    batch = images()
    model = CLIPModel.from_pretrained(folders["clip"]).eval()
    cosine = cosine_by_hand(model, folders["clip"], batch, PROMPTS)
    scores = score_all([models["clip_score"], models["pickscore"]], batch, PROMPTS)
    torch.testing.assert_close(scores["clip_score"], cosine, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        scores["pickscore"], model.logit_scale.exp().detach() * cosine, rtol=1e-5, atol=1e-5
    )


def test_hpsv2_weights_converted_from_open_clip_score_as_the_original_model(
    models: dict[str, RewardModel], folders: dict[str, Path]
) -> None:
    original, _ = build_tiny_clip(seed=2)
    loaded = models["hpsv2"].model  # type: ignore[attr-defined]
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    batch = images()
    torch.testing.assert_close(
        models["hpsv2"].score(batch, PROMPTS)["hpsv2"],
        cosine_by_hand(original, folders["hpsv2"] / "clip", batch, PROMPTS),
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_aesthetic_is_the_head_on_the_normalised_image_embedding(tmp_path: Path, suffix: str) -> None:
    clip, head = save_tiny_aesthetic(tmp_path, seed=3, head_suffix=suffix)
    (model,) = build_reward_models(["aesthetic"], paths={"aesthetic": str(tmp_path)})
    batch = images()
    with torch.no_grad():
        embeds = clip.visual_projection(clip.vision_model(pixel_values=normalise(batch)).pooler_output)
        expected = head.layers(F.normalize(embeds, dim=-1)).squeeze(-1)
    torch.testing.assert_close(model.score(batch, PROMPTS)["aesthetic"], expected, rtol=0, atol=1e-5)


def test_wrongly_shaped_aesthetic_head_names_the_file(tmp_path: Path) -> None:
    save_tiny_aesthetic(tmp_path)
    (tmp_path / "aesthetic_head.safetensors").unlink()
    file = tmp_path / "head.safetensors"
    save_file(ScoreHead(48).state_dict(), file)
    with pytest.raises(
        ValueError, match=rf"{file} does not fit ScoreHead: wrong shape: layers\.0\.weight \(1024, 48\)"
    ):
        build_reward_models(["aesthetic"], paths={"aesthetic": str(tmp_path)})
    (tmp_path / "second.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="exactly one checkpoint file"):
        build_reward_models(["aesthetic"], paths={"aesthetic": str(tmp_path)})


def test_bad_hps_checkpoints_name_the_file(tmp_path: Path) -> None:
    model, tokenizer = build_tiny_clip()
    save_clip_folder(model, tokenizer, tmp_path / "clip")
    paths = {"hpsv2": str(tmp_path)}
    state = to_open_clip(model)
    del state["visual.ln_post.bias"]
    file = save_hps(tmp_path, model, state)
    with pytest.raises(
        ValueError, match=rf"{file} does not fit CLIPModel: missing: vision_model\.post_layernorm\.bias"
    ):
        build_reward_models(["hpsv2"], paths=paths)
    state["visual.attn_pool.query"] = torch.zeros(1)
    save_hps(tmp_path, model, state)
    with pytest.raises(ValueError, match=rf"{file}: not an open_clip ViT CLIP state dict: unknown keys"):
        build_reward_models(["hpsv2"], paths=paths)
    file.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"{file} is not a readable torch checkpoint"):
        build_reward_models(["hpsv2"], paths=paths)


def test_clip_folder_whose_weights_do_not_fit_its_config_is_refused(tmp_path: Path) -> None:
    save_tiny_clip(tmp_path / "a")
    wide, tokenizer = build_tiny_clip()
    wide.config.projection_dim = 48
    save_clip_folder(CLIPModel(wide.config), tokenizer, tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(
        ValueError, match=rf"the weights in {tmp_path / 'b'} do not fit its config.json: wrong shape"
    ):
        build_reward_models(["clip_score"], paths={"clip": str(tmp_path / "b")})
    (tmp_path / "a" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'a'} has no tokenizer"):
        build_reward_models(["clip_score"], paths={"clip": str(tmp_path / "a")})


def test_image_transform_resizes_crops_pads_and_normalises(tmp_path: Path) -> None:
    square = images(2, 32)
    torch.testing.assert_close(ImageTransform(32)(square), normalise(square))
    wide = images(2, 32).repeat(1, 1, 1, 2)[..., :48]  # 32 x 48: the short side is already the size
    torch.testing.assert_close(ImageTransform(32)(wide), normalise(wide[..., 8:40]))
    flat = torch.full((1, 3, 64, 96), 0.5)
    torch.testing.assert_close(ImageTransform(32)(flat), normalise(torch.full((1, 3, 32, 32), 0.5)))
    padded = ImageTransform(32, fit="pad")(flat)  # 64 x 96 -> 21 x 32, centred on black: rows 5..25
    black, grey = normalise(torch.zeros(1, 3, 32, 32)), normalise(torch.full((1, 3, 32, 32), 0.5))
    torch.testing.assert_close(padded[..., :5, :], black[..., :5, :])
    torch.testing.assert_close(padded[..., 5:26, :], grey[..., 5:26, :])
    torch.testing.assert_close(padded[..., 26:, :], black[..., 26:, :])
    (tmp_path / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}'
    )
    transform = ImageTransform.for_folder(tmp_path, 32)
    assert (transform.mean, transform.std, transform.size) == ((0.5,) * 3, (0.25,) * 3, 32)


def test_imagereward_from_blip_weights_scores_as_blip_computes_it(
    models: dict[str, RewardModel], folders: dict[str, Path]
) -> None:
    state = torch.load(folders["imagereward"] / "ImageReward.pt", weights_only=True)
    batch = images()
    expected = imagereward_by_hand(state, folders["imagereward"], batch, PROMPTS)
    # The tiny head squeezes the scores into a narrow band (~1e-3 wide), so the tolerance is tight: the two
    # computations agree to the last bit on a CPU, and a causal text encoder, say, is off by ~3e-4.
    scores = models["imagereward"].score(batch, PROMPTS)["imagereward"]
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)


def test_imagereward_reads_the_whole_prompt(models: dict[str, RewardModel]) -> None:
    """Bidirectional text attention: the [CLS] feature, so the score, changes with the prompt's last word."""
    scores = models["imagereward"].score(images(1).expand(2, -1, -1, -1), ["a red circle", "a red square"])
    assert scores["imagereward"][0] != scores["imagereward"][1]


def test_bad_imagereward_checkpoints_name_the_file(tmp_path: Path) -> None:
    state = save_imagereward(tmp_path)
    file = tmp_path / "ImageReward.pt"
    paths = {"imagereward": str(tmp_path)}
    torch.save({k: v for k, v in state.items() if k != "mlp.layers.7.bias"}, file)
    with pytest.raises(ValueError, match=rf"{file} does not fit ScoreHead: missing: layers\.7\.bias"):
        build_reward_models(["imagereward"], paths=paths)
    torch.save({**state, "blip.visual_encoder.blocks.0.ls1.gamma": torch.ones(1)}, file)
    with pytest.raises(
        ValueError, match=rf"{file}: not an ImageReward checkpoint: not a BLIP ViT: unknown keys"
    ):
        build_reward_models(["imagereward"], paths=paths)
    torch.save({k.replace("blip.", "model."): v for k, v in state.items()}, file)
    with pytest.raises(ValueError, match=rf"{file}: not an ImageReward checkpoint"):
        build_reward_models(["imagereward"], paths=paths)
