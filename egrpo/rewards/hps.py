"""HPSv2.1 (model `hpsv2`, reward `hpsv2`): Human Preference Score v2.1, an OpenCLIP ViT-H-14 fine-tuned on
human preferences between generated images, loaded into transformers' CLIPModel.

The released checkpoint (HPS_v2.1_compressed.pt, from xswu/HPSv2) is an open_clip state dict under the key
"state_dict". open_clip needs torchvision, which egrpo does not install, so the weights are renamed into a
transformers CLIPModel built from the config of the CLIP that HPS was fine-tuned from (`open_clip_to_clip`
documents the key map). Both compute the same function: pre-norm transformer blocks, class-token pooling with
a final LayerNorm for images, causal text attention pooled at the end-of-text token, linear projections.

Path layout (a folder):

    <path>/clip/                     laion/CLIP-ViT-H-14-laion2B-s32B-b79K's transformers files: config.json
                                     (its `gelu` activation and 16 heads per tower cannot be read off the
                                     weights), the tokenizer files (open_clip's BPE vocabulary and merges;
                                     prompts are cleaned, split and padded as open_clip's tokenizer does it,
                                     see egrpo.rewards.tokenization) and preprocessor_config.json. Its weights
                                     are not read: a symlink to a full download works too.
    <path>/HPS_v2.1_compressed.pt    the checkpoint; any one *.pt, *.pth or *.bin file directly in <path>

Score: the cosine of the image and prompt embeddings, as HPSv2's own scoring computes it; about 0.25-0.35
for current text-to-image models (FLUX.1-dev about 0.31; RL against HPS pushes it towards 0.37-0.40). Images
are fitted the way HPSv2 evaluates them: the longer side resized to 224 and the rest padded black (for square
images the same as CLIP's crop).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from egrpo.rewards.base import weights_path
from egrpo.rewards.clip import ClipSimilarity, ImageTransform, check_clip_tokenizer
from egrpo.rewards.loading import (
    Needed,
    check_vocabulary,
    load_checkpoint_file,
    load_config,
    load_state,
    load_tokenizer,
    require_files,
    single_checkpoint,
)
from egrpo.rewards.tokenization import OPEN_CLIP_SPECIALS, ClipPrompts

# open_clip name -> transformers CLIPModel name, for the keys outside the transformer blocks.
# visual.proj and text_projection are (width, embed) matrices applied as x @ proj; transformers' projections
# are nn.Linear, whose weight is the transpose (see _TRANSPOSED).
_FIXED = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj", "text_projection"}

# Transformer blocks: <tower>transformer.resblocks.N.<part> -> <tower>encoder.layers.N.<part>.
_TOWERS = {"visual.": "vision_model.", "": "text_model."}
_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# nn.MultiheadAttention's packed input projection, rows in q, k, v order -> three separate projections.
_IN_PROJ = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}


def open_clip_to_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip CLIP state dict (a ViT image tower, open_clip's own text tower) to transformers'
    CLIPModel names.

    Outside the blocks: visual.conv1 -> vision_model.embeddings.patch_embedding, visual.class_embedding and
    visual.positional_embedding -> the vision embeddings' class_embedding and position_embedding.weight,
    visual.ln_pre / ln_post -> vision_model.pre_layrnorm / post_layernorm, token_embedding and
    positional_embedding -> the text embeddings', ln_final -> text_model.final_layer_norm, visual.proj and
    text_projection (transposed) -> visual_projection.weight and text_projection.weight, logit_scale as is.
    In each block ([visual.]transformer.resblocks.N -> vision_model/text_model.encoder.layers.N): ln_1 /
    ln_2 -> layer_norm1 / layer_norm2, attn.in_proj_weight / _bias split in three -> self_attn.q_proj /
    k_proj / v_proj, attn.out_proj -> self_attn.out_proj, mlp.c_fc / c_proj -> mlp.fc1 / fc2.

    A key this map does not know (an open_clip variant with a different architecture) raises ValueError."""
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _FIXED:
            converted[_FIXED[key]] = value.t() if key in _TRANSPOSED else value
            continue
        block = _BLOCK.fullmatch(key)
        if block is None:
            unknown.append(key)
            continue
        tower, index, part = block.groups()
        prefix = f"{_TOWERS[tower or '']}encoder.layers.{index}."
        if part in _IN_PROJ:
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                converted[f"{prefix}self_attn.{name}.{_IN_PROJ[part]}"] = chunk
            continue
        module, _, leaf = part.rpartition(".")
        if module not in _BLOCK_PARTS:
            unknown.append(key)
            continue
        converted[f"{prefix}{_BLOCK_PARTS[module]}.{leaf}"] = value
    if unknown:
        raise ValueError(f"not an open_clip ViT CLIP state dict: unknown keys {unknown[:4]}")
    return converted


# What load_hpsv2 reads (the module docstring's layout): clip/'s weights are not among them.
HPS_FILES = (
    Needed("checkpoint", what="HPSv2's checkpoint"),
    Needed("tokenizer", "clip"),
    Needed("config", "clip"),
)


def check_hps_folder(folder: Path) -> None:
    """The pre-flight check of an `hpsv2` folder (egrpo.rewards.base.check_reward_folder): HPS_FILES are there
    and clip/'s tokenizer fits its config's text vocabulary, without reading the checkpoint."""
    require_files(folder, HPS_FILES)
    check_clip_tokenizer(folder / "clip")


def load_hpsv2(path: str | None, device: str) -> ClipSimilarity:
    """The `hpsv2` reward model from the folder layout in the module docstring."""
    folder = weights_path("hpsv2", path)
    require_files(folder, HPS_FILES)
    checkpoint_file = single_checkpoint(folder)
    clip_folder = folder / "clip"
    tokenizer = load_tokenizer(clip_folder)
    config = load_config(CLIPConfig, clip_folder)
    check_vocabulary(
        tokenizer, config.text_config.vocab_size, clip_folder, f"{clip_folder / 'config.json'} (text_config)"
    )
    checkpoint = load_checkpoint_file(checkpoint_file)
    # The released file wraps the weights in a training checkpoint; a bare state dict is accepted too.
    state = checkpoint.get("state_dict", checkpoint)
    try:
        converted = open_clip_to_clip(state)
    except ValueError as e:
        raise ValueError(f"{checkpoint_file}: {e}") from e
    with torch.device(device):  # initialise the 1B parameters where they will live, which is faster on a GPU
        model = CLIPModel(config)
    load_state(model, converted, checkpoint_file)
    transform = ImageTransform.for_folder(clip_folder, config.vision_config.image_size, fit="pad")
    # HPSv2 scores with open_clip's tokenizer, not the folder's transformers one (which would, among other
    # things, read each "!" in a prompt as LAION's pad token)
    tokenize = ClipPrompts(tokenizer, OPEN_CLIP_SPECIALS, config.text_config.max_position_embeddings)
    return ClipSimilarity("hpsv2", model.eval(), tokenize, transform)
