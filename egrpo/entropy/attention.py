"""AEGPO's attention-entropy probe (ALGORITHMS.md section 3, `aegpo`).

For one transformer call and a sample of image-query rows, each row's attention distribution over all keys,
p = softmax(q K^T / sqrt(d)), has the normalised entropy H = -sum_j p_j log p_j / log(N_keys), in [0, 1].
E is H averaged over the probed heads, the sampled rows and the probed attention blocks: one value per sample.

How the probe sees Q and K. It never touches the attention processors: on entry it registers a forward
pre-hook on each probed attention module, and on exit removes every hook, so outside the context the model is
exactly as it was, and inside it every module still runs its own processor and fused attention kernel, whose
output is therefore bit-for-bit the unprobed one. The pre-hook receives the module's own inputs and, under
`no_grad`, recomputes the keys and the queries of the sampled rows with the lines of diffusers' processors that
make them: the module's own (possibly LoRA-wrapped) `to_k`/`add_k_proj`/`to_q`, its per-head RMS norms, then
RoPE. K is the same computation on the same inputs as in the processor; Q is projected for the sampled rows
only, so it can differ from the kernel's in the last float bits. Recomputing costs one extra key projection per
probed block; in exchange it works with any attention backend (flash, sage, ...), whose kernels are not torch
functions that could be intercepted. Wrapping the processors instead would also change which keyword
arguments the attention modules pass on, since diffusers filters those by the processor's signature.

Which query rows are image rows, per processor (diffusers 0.42):
- FLUX double-stream blocks (`FluxAttnProcessor` with `encoder_hidden_states`): the joint sequence is
  [text, image]; the text stream comes in as `encoder_hidden_states` (projected by `add_*_proj`).
- FLUX single-stream blocks: the block concatenates [text, image] itself and the attention gets only the
  joint sequence, so the image rows are its last N_img rows, N_img being the token count of the
  transformer's own `hidden_states` (a pre-hook on the transformer records it for each call).
- SD3 joint blocks (`JointAttnProcessor2_0`): the joint sequence is [image, text]. SD3.5's image-only second
  attention (`attn2`) is not probed: the probed modules are each block's joint `attn`.
Both families use SDPA's default scale 1/sqrt(d) and no attention mask in the probed modules.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn


def attention_entropy(query: torch.Tensor, key: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Normalised attention entropy of the given query rows, averaged over heads and rows (ALGORITHMS.md
    section 3, `aegpo`): mean over h, r of -sum_j p_hrj log p_hrj / log N, p_hr = softmax(q_hr K_h^T / sqrt(d)).

    query (B, heads, R, d) holds just the rows to measure; key (B, heads, N, d) all keys. Returns (B,) float32
    in [0, 1]. Rows are processed `chunk` at a time in float32, so besides a float32 copy of the keys no
    tensor exceeds B x heads x chunk x N elements, and at most two of those are alive at once.
    """
    batch, heads, rows, dim = query.shape
    keys = key.shape[2]
    if key.shape[:2] != (batch, heads) or key.shape[3] != dim:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not match")
    if rows < 1:
        raise ValueError("attention entropy needs at least one query row")
    if keys < 2:
        raise ValueError("attention entropy needs at least two keys (it is normalised by log N_keys)")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    key_t = key.float().transpose(-1, -2)
    total = torch.zeros(batch, dtype=torch.float32, device=query.device)
    for start in range(0, rows, chunk):
        # Scaling the few query rows is cheaper than scaling the chunk x N scores.
        q = query[:, :, start : start + chunk].float() * dim**-0.5
        logp = torch.log_softmax(q @ key_t, dim=-1)
        # p log p in place: logp and one more chunk-sized buffer are all this step holds.
        total -= logp.exp().mul_(logp).sum(dim=(1, 2, 3))
    return total / (heads * rows * math.log(keys))


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe measures. Block indices count the transformer's probed attention modules in forward
    order: FLUX's double-stream blocks then its single-stream blocks, SD3's joint blocks."""

    blocks: tuple[int, ...] = ()  # () = all blocks
    heads: tuple[int, ...] = ()  # () = all heads
    rows: int = 64  # image-query rows sampled per call; all of them if the image has fewer tokens
    chunk: int = 128  # query rows per softmax chunk (bounds memory)
    seed: int = 0  # with the block index and image size, fixes the sampled rows (`sample_rows`)

    def __post_init__(self) -> None:
        if self.rows < 1 or self.chunk < 1:
            raise ValueError(f"rows and chunk must be positive, got rows={self.rows}, chunk={self.chunk}")
        for name in ("blocks", "heads"):
            values = getattr(self, name)
            if any(v < 0 for v in values) or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct non-negative indices, got {values}")


def sample_rows(seed: int, block: int, image_tokens: int, rows: int) -> torch.Tensor:
    """The image-query rows the probe measures in `block`: `rows` distinct indices in [0, image_tokens), sorted
    (all of them if there are fewer). They depend on (seed, block, image_tokens) only, so every call of a
    block - at every step, and under the reference policy - measures the same rows."""
    generator = torch.Generator().manual_seed(seed * 100_003 + block)
    return torch.randperm(image_tokens, generator=generator)[:rows].sort().values


def probed_attentions(transformer: nn.Module) -> list[nn.Module]:
    """The attention modules the probe can measure, in forward order (see `ProbeSettings`)."""
    if isinstance(transformer, FluxTransformer2DModel):
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    elif isinstance(transformer, SD3Transformer2DModel):
        blocks = list(transformer.transformer_blocks)
    else:
        raise TypeError(
            f"attention entropy probes support FLUX and SD3 transformers, not {type(transformer)}"
        )
    return [block.attn for block in blocks]


class AttentionEntropyProbe:
    """Measures E on every forward call of `transformer` inside the context (see the module docstring):

        with AttentionEntropyProbe(transformer, settings) as probe:
            model(...)
            e = probe.take()  # (B,)

    `take()` returns the mean over the probed calls since the last `take()` and resets. The probe is meant for
    no-grad rollouts: under gradient checkpointing the recomputed forward would be measured twice.
    """

    def __init__(self, transformer: nn.Module, settings: ProbeSettings | None = None) -> None:
        self.transformer = transformer
        self.settings = settings or ProbeSettings()
        self._flux = isinstance(transformer, FluxTransformer2DModel)
        attentions = probed_attentions(transformer)
        blocks = self.settings.blocks or tuple(range(len(attentions)))
        if max(blocks, default=-1) >= len(attentions):
            raise IndexError(
                f"probe blocks {blocks} out of range: the model has {len(attentions)} attention blocks"
            )
        self._sites = [(block, attentions[block]) for block in blocks]
        for block, attn in self._sites:
            _check_supported(block, attn, self.settings.heads)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._rows: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._image_tokens = 0  # of the current FLUX call; single-stream blocks need it
        self._sum: torch.Tensor | None = None
        self._calls = 0

    def __enter__(self) -> AttentionEntropyProbe:
        if self._handles:
            raise RuntimeError("this probe is already installed")
        if self._flux:
            signature = inspect.signature(self.transformer.forward)
            self._handles.append(
                self.transformer.register_forward_pre_hook(
                    lambda _, args, kwargs: self._record_image_tokens(signature, args, kwargs),
                    with_kwargs=True,
                )
            )
        for block, attn in self._sites:
            self._handles.append(attn.register_forward_pre_hook(self._hook(block, attn), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def take(self) -> torch.Tensor:
        """(B,) float32: E averaged over the probed attention calls since the last `take()`; then resets."""
        if self._sum is None:
            raise RuntimeError("no probed attention call since the last take()")
        mean = self._sum / self._calls
        self._sum, self._calls = None, 0
        return mean

    # ---------------------------------------------------------------------------------------------- hooks

    def _record_image_tokens(self, signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> None:
        self._image_tokens = signature.bind(*args, **kwargs).arguments["hidden_states"].shape[1]

    def _hook(self, block: int, attn: nn.Module) -> Callable[[nn.Module, tuple, dict[str, Any]], None]:
        signature = inspect.signature(attn.forward)

        @torch.no_grad()
        def hook(_: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            inputs = signature.bind(*args, **kwargs).arguments
            if self._flux:
                query, key = self._flux_query_key(block, attn, inputs)
            else:
                query, key = self._sd3_query_key(block, attn, inputs)
            self._add(attention_entropy(query, key, self.settings.chunk))

        return hook

    def _flux_query_key(
        self, block: int, attn: nn.Module, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Q of the sampled image rows and all of K, as `FluxAttnProcessor` makes them; joint order [text, image]."""
        if inputs.get("attention_mask") is not None:
            raise ValueError("the attention entropy probe does not support attention masks")
        hidden, text = inputs["hidden_states"], inputs.get("encoder_hidden_states")
        heads = self.settings.heads
        key = _heads(attn, attn.to_k, attn.norm_k, hidden, heads)
        if text is not None:  # double-stream: hidden_states is the image stream
            text_tokens, image = text.shape[1], hidden
            key = torch.cat([_heads(attn, attn.add_k_proj, attn.norm_added_k, text, heads), key], dim=1)
        else:  # single-stream: hidden_states is the joint sequence
            text_tokens = hidden.shape[1] - self._image_tokens
            image = hidden[:, text_tokens:]
        rows = self._sample_rows(block, image.shape[1], hidden.device)
        positions = rows + text_tokens
        query = _heads(attn, attn.to_q, attn.norm_q, image[:, rows], heads)
        rotary = inputs.get("image_rotary_emb")
        if rotary is not None:
            cos, sin = rotary
            query = apply_rotary_emb(query, (cos[positions], sin[positions]), sequence_dim=1)
            key = apply_rotary_emb(key, rotary, sequence_dim=1)
        return query.transpose(1, 2), key.transpose(1, 2)

    def _sd3_query_key(
        self, block: int, attn: nn.Module, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Q of the sampled image rows and all of K, as `JointAttnProcessor2_0` makes them; joint order
        [image, text]. (That processor ignores `attention_mask`, so the probe does too.)"""
        image, text = inputs["hidden_states"], inputs.get("encoder_hidden_states")
        heads = self.settings.heads
        rows = self._sample_rows(block, image.shape[1], image.device)
        query = _heads(attn, attn.to_q, attn.norm_q, image[:, rows], heads)
        key = _heads(attn, attn.to_k, attn.norm_k, image, heads)
        if text is not None:
            key = torch.cat([key, _heads(attn, attn.add_k_proj, attn.norm_added_k, text, heads)], dim=1)
        return query.transpose(1, 2), key.transpose(1, 2)

    # ------------------------------------------------------------------------------------------- helpers

    def _sample_rows(self, block: int, image_tokens: int, device: torch.device) -> torch.Tensor:
        cache_key = (block, image_tokens, device)
        if cache_key not in self._rows:
            rows = sample_rows(self.settings.seed, block, image_tokens, self.settings.rows)
            self._rows[cache_key] = rows.to(device)
        return self._rows[cache_key]

    def _add(self, entropy: torch.Tensor) -> None:
        if self._sum is None:
            self._sum = entropy
        elif self._sum.shape != entropy.shape:
            raise RuntimeError(
                f"batch size changed from {self._sum.shape[0]} to {entropy.shape[0]} without a take() in between"
            )
        else:
            self._sum = self._sum + entropy
        self._calls += 1


def _heads(
    attn: nn.Module, linear: nn.Module, norm: nn.Module | None, x: torch.Tensor, heads: tuple[int, ...]
) -> torch.Tensor:
    """(B, N, heads, d): a projection split into heads, the selected ones kept, then the per-head q/k norm;
    as the processors do it, except that selecting heads first skips norms whose output is not used."""
    out = linear(x).unflatten(-1, (attn.heads, -1))
    if heads:
        out = out[:, :, list(heads)]
    return norm(out) if norm is not None else out


def _check_supported(block: int, attn: nn.Module, heads: tuple[int, ...]) -> None:
    """The recomputation in the hooks mirrors these processors' Q/K lines; anything else would be measured
    wrongly, so it is refused up front."""
    if type(attn.processor) not in (FluxAttnProcessor, JointAttnProcessor2_0):
        raise TypeError(
            f"attention block {block} uses {type(attn.processor).__name__}; the entropy probe supports "
            "FluxAttnProcessor and JointAttnProcessor2_0"
        )
    if getattr(attn, "fused_projections", False):
        raise ValueError(f"attention block {block} has fused QKV projections; unfuse them to probe it")
    if heads and max(heads) >= attn.heads:
        raise IndexError(f"probe heads {heads} out of range: block {block} has {attn.heads} heads")
