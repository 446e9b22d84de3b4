"""ImageReward (model `imagereward`, reward `imagereward`): BLIP fine-tuned on human rankings of generated
images. The prompt is read by BLIP's BERT text encoder, which cross-attends to the ViT-L/16 image tokens; an
MLP head maps the [CLS] feature to a reward. Re-implemented on transformers' BLIP classes, which follow
Salesforce BLIP's modules one to one (`blip_to_transformers` documents the renaming).

Path layout (a folder holding THUDM/ImageReward's files):

    <path>/ImageReward.pt     the state dict: blip.visual_encoder.* (the ViT), blip.text_encoder.* (the BERT
                              with cross-attention), mlp.* (the head); any one *.pt, *.pth, *.bin or
                              *.safetensors file
    <path>/med_config.json    BLIP's BERT config for the text encoder
    <path>/tokenizer/         bert-base-uncased's tokenizer files (vocab.txt and/or tokenizer.json;
                              config.json and tokenizer_config.json are optional), read as a BertTokenizer
                              with BLIP's [DEC] and [ENC] tokens added, as BLIP's init_tokenizer builds it

The ViT's shape is read off the checkpoint (BLIP's ViTs have 64-wide attention heads and LayerNorm eps 1e-6);
its width also sets the text encoder's cross-attention width, as BLIP does, whatever med_config.json says.
Other keys in the file (BLIP's contrastive projections, buffers) are not used by the score and are ignored,
as ImageReward's own non-strict loading ignores them.

Prompts are tokenised as ImageReward's own code does: that tokenizer with padding="max_length", truncation and
max_length=35 ([CLS], at most 33 word pieces, [SEP], then [PAD] = 0).

Score: the head's output standardised with ImageReward's constants, (r - 0.16717) / 1.03334, so 0 is the mean
and 1 the standard deviation over the human-rated images it was trained on; generated images mostly score
between -2 and 2; older Stable Diffusion models average about 0.1-0.3, FLUX.1-dev about 1.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import (
    BertTokenizer,
    BlipTextConfig,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
    PreTrainedTokenizerBase,
)

from egrpo.rewards.aesthetic import ScoreHead
from egrpo.rewards.base import weights_path
from egrpo.rewards.clip import ImageTransform, mask_unscorable, split_unscorable
from egrpo.rewards.loading import (
    Needed,
    check_vocabulary,
    load_checkpoint_file,
    load_state,
    load_tokenizer,
    require_file,
    require_files,
    single_checkpoint,
)
from egrpo.rewards.tokenization import PromptTokenizer, TransformersPrompts

# ImageReward's standardisation of the head's output.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
# ImageReward tokenizes prompts to at most this many tokens (with [CLS] and [SEP]).
MAX_PROMPT_TOKENS = 35
# Width of one attention head in BLIP's ViTs (ViT-B: 768 / 12, ViT-L: 1024 / 16).
HEAD_WIDTH = 64
VISION_LAYER_NORM_EPS = 1e-6

_VISION_PREFIX, _TEXT_PREFIX, _HEAD_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp."
# Salesforce BLIP's (timm-style) ViT names -> transformers' BlipVisionModel names.
_VISION_FIXED = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
_VISION_PARTS = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def blip_to_transformers(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split and rename an ImageReward state dict into (BlipVisionModel, BlipTextModel, ScoreHead) ones.

    Vision (blip.visual_encoder.*): cls_token, pos_embed, patch_embed.proj -> embeddings.class_embedding,
    .position_embedding, .patch_embedding; blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2} ->
    encoder.layers.N.{layer_norm1, self_attn.qkv, self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2} (the
    fused qkv has the same layout in both); norm -> post_layernorm. Text (blip.text_encoder.*): transformers'
    BlipTextModel was ported from BLIP's BERT and keeps its names; the position_ids buffer is dropped. Head
    (mlp.*): the names without the prefix. Keys outside these three prefixes are dropped; an unknown key
    inside the vision prefix raises ValueError."""
    vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith(_VISION_PREFIX):
            name = key.removeprefix(_VISION_PREFIX)
            block = _VISION_BLOCK.fullmatch(name)
            if name in _VISION_FIXED:
                vision[_VISION_FIXED[name]] = value
            elif block and block[2] in _VISION_PARTS:
                vision[f"encoder.layers.{block[1]}.{_VISION_PARTS[block[2]]}.{block[3]}"] = value
            else:
                unknown.append(key)
        elif key.startswith(_TEXT_PREFIX) and not key.endswith("position_ids"):
            text[key.removeprefix(_TEXT_PREFIX)] = value
        elif key.startswith(_HEAD_PREFIX):
            head[key.removeprefix(_HEAD_PREFIX)] = value
    if unknown:
        raise ValueError(f"not a BLIP ViT: unknown keys {unknown[:4]}")
    return vision, text, head


def vision_config_from_state(vision: Mapping[str, torch.Tensor]) -> BlipVisionConfig:
    """The BlipVisionConfig of a converted BLIP ViT state dict, read off its shapes."""
    hidden, _, patch, _ = vision["embeddings.patch_embedding.weight"].shape
    patches = vision["embeddings.position_embedding"].shape[1] - 1
    layers = sum(1 for key in vision if key.endswith("layer_norm1.weight"))
    return BlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_WIDTH,
        image_size=math.isqrt(patches) * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
    )


def text_config_from_med(med: Mapping, encoder_width: int) -> BlipTextConfig:
    """The BlipTextConfig of BLIP's BERT from its med_config.json, cross-attending to `encoder_width`-wide
    image tokens. is_decoder=True only makes transformers build the cross-attention layers; the text is
    encoded bidirectionally (ImageRewardModel passes is_decoder=False to the forward)."""
    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0),
        is_decoder=True,
    )


class ImageRewardModel:
    """ImageReward's score of each image for its prompt; see the module docstring for the scale."""

    names: tuple[str, ...] = ("imagereward",)

    def __init__(
        self,
        vision: BlipVisionModel,
        text: BlipTextModel,
        head: ScoreHead,
        tokenize: PromptTokenizer,
        transform: ImageTransform,
    ) -> None:
        self.vision = vision
        self.text = text
        self.head = head
        self.tokenize = tokenize
        self.transform = transform

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        images, finite = split_unscorable(images, prompts)
        device = self.vision.device
        image_tokens = self.vision(pixel_values=self.transform(images.to(device))).last_hidden_state
        tokens = {key: value.to(device) for key, value in self.tokenize(prompts).items()}
        features = self.text(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=device),
            is_decoder=False,
        ).last_hidden_state[:, 0]
        reward = (self.head(features) - REWARD_MEAN) / REWARD_STD
        return {"imagereward": mask_unscorable(reward, finite)}


def load_blip_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """BLIP's tokenizer from bert-base-uncased's files in `folder`, as BLIP's init_tokenizer builds it:
    a BertTokenizer (whatever config files are there or missing, so it always has its [PAD] = 0 pad token)
    with [DEC] as bos_token and [ENC] as an additional special token; for files that already hold them (a
    saved BLIP tokenizer) this changes nothing."""
    tokenizer = load_tokenizer(folder, BertTokenizer)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


# What load_imagereward reads (the module docstring's layout).
IMAGEREWARD_FILES = (
    Needed("checkpoint", what="ImageReward's checkpoint"),
    Needed("tokenizer", "tokenizer"),
    Needed("file", name="med_config.json", what="BLIP's text encoder config"),
)


def blip_tokenizer_and_med(folder: Path) -> tuple[PreTrainedTokenizerBase, dict]:
    """An `imagereward` folder's BLIP tokenizer and med_config.json, the tokenizer checked to fit the text
    encoder's vocab_size *with* the [DEC] and [ENC] tokens BLIP adds (bert-base-uncased's 30522 + 2 = the
    30524 of ImageReward's med_config.json). Cheap: no weights are read."""
    tokenizer = load_blip_tokenizer(folder / "tokenizer")
    med_file = require_file(folder / "med_config.json", "BLIP's text encoder config")
    try:
        med = json.loads(med_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{med_file} is not valid JSON: {e}") from None
    if not isinstance(med, dict) or not isinstance(med.get("vocab_size"), int):
        raise ValueError(f"{med_file} is not a BERT config: it has no integer vocab_size")
    check_vocabulary(tokenizer, med["vocab_size"], folder / "tokenizer", str(med_file))
    return tokenizer, med


def check_imagereward_folder(folder: Path) -> None:
    """The pre-flight check of an `imagereward` folder (egrpo.rewards.base.check_reward_folder): the files in
    IMAGEREWARD_FILES are there and the tokenizer fits med_config.json, without reading the checkpoint."""
    require_files(folder, IMAGEREWARD_FILES)
    blip_tokenizer_and_med(folder)


def load_imagereward(path: str | None, device: str) -> ImageRewardModel:
    """The `imagereward` reward model from the folder layout in the module docstring."""
    folder = weights_path("imagereward", path)
    require_files(folder, IMAGEREWARD_FILES)
    checkpoint_file = single_checkpoint(folder)
    tokenizer, med = blip_tokenizer_and_med(folder)
    tokenize = TransformersPrompts(tokenizer, max_length=MAX_PROMPT_TOKENS, padding="max_length")
    checkpoint = load_checkpoint_file(checkpoint_file)
    try:
        vision_state, text_state, head_state = blip_to_transformers(checkpoint)
        vision_config = vision_config_from_state(vision_state)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{checkpoint_file}: not an ImageReward checkpoint: {e}") from e
    with torch.device(device):  # initialise where the weights will live, which is faster on a GPU
        vision = BlipVisionModel(vision_config)
        text = BlipTextModel(text_config_from_med(med, vision_config.hidden_size), add_pooling_layer=False)
        head = ScoreHead(text.config.hidden_size)
    for module, state in ((vision, vision_state), (text, text_state), (head, head_state)):
        load_state(module, state, checkpoint_file)
    transform = ImageTransform(vision_config.image_size)
    return ImageRewardModel(vision.eval(), text.eval(), head.eval(), tokenize, transform)
