"""AEGPO's attention-entropy probe (ALGORITHMS.md section 3, `aegpo`).

For one transformer call and a sample of image-query rows, each row's attention distribution over all keys,
p = softmax(q K^T / sqrt(d)), has the normalised entropy H = -sum_j p_j log p_j / log(N_keys), in [0, 1].
E is H averaged over the probed heads, the sampled rows and the probed attention blocks: one value per sample.

How the probe sees Q and K. It never touches the attention processors: on entry it registers a forward
pre-hook on each probed attention module, and on exit removes every hook, so outside the context the model is
exactly as it was, and inside it every module still runs its own processor and fused attention kernel, whose
output is therefore bit-for-bit the unprobed one. The pre-hook receives the module's own inputs and, under
`no_grad`, recomputes the keys and the queries of the sampled rows with the lines of diffusers' processors that
make them: the module's own (possibly LoRA-wrapped) projections, its per-head norms, then RoPE. K is the same
computation on the same inputs as in the processor; Q is projected for the sampled rows only, so it can differ
from the kernel's in the last float bits. Recomputing costs one extra key projection per probed block; in
exchange it works with any attention backend (flash, sage, ...), whose kernels are not torch functions that
could be intercepted. Wrapping the processors instead would also change which keyword arguments the attention
modules pass on, since diffusers filters those by the processor's signature.

Which modules are probed, and which query rows are image rows in each, is the model family's knowledge: its
FlowPolicy subclass (egrpo/models/families/) gives `attention_modules`, `check_probe_support`, `probe_call` (what
the transformer call itself tells, e.g. FLUX's image token count) and `probe_query_key` (Q, K and, where the
processor masks padded keys, the key mask). Keys outside the mask are left out of the softmax and of the
normalisation, exactly as the masked kernel leaves them out.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from egrpo.models.families import family_of_transformer


def attention_entropy(
    query: torch.Tensor, key: torch.Tensor, chunk: int = 128, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalised attention entropy of the given query rows, averaged over heads and rows (ALGORITHMS.md
    section 3, `aegpo`): mean over h, r of -sum_j p_hrj log p_hrj / log N, p_hr = softmax(q_hr K_h^T / sqrt(d)).

    query (B, heads, R, d) holds just the rows to measure; key (B, heads, N, d) all keys; key_mask (B, N) bool,
    if given, the keys each sample attends to (N is then its count of them). Returns (B,) float32 in [0, 1].
    Rows are processed `chunk` at a time in float32, so besides a float32 copy of the keys no tensor exceeds
    B x heads x chunk x N elements, and at most two of those are alive at once.
    """
    batch, heads, rows, dim = query.shape
    if key.shape[:2] != (batch, heads) or key.shape[3] != dim:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not match")
    if key_mask is not None and key_mask.shape != (batch, key.shape[2]):
        raise ValueError(f"key_mask {tuple(key_mask.shape)} does not match key {tuple(key.shape)}")
    keys = key_mask.sum(dim=1) if key_mask is not None else torch.full((batch,), key.shape[2], device=key.device)
    if rows < 1:
        raise ValueError("attention entropy needs at least one query row")
    if int(keys.min()) < 2:
        raise ValueError("attention entropy needs at least two keys (it is normalised by log N_keys)")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    key_t = key.float().transpose(-1, -2)
    # a masked key's score is -inf: p = 0, and 0 log 0 is taken as 0 below
    bias = None if key_mask is None else torch.zeros(key_mask.shape, device=key.device).masked_fill_(
        ~key_mask, float("-inf"))[:, None, None, :]
    total = torch.zeros(batch, dtype=torch.float32, device=query.device)
    for start in range(0, rows, chunk):
        # Scaling the few query rows is cheaper than scaling the chunk x N scores.
        q = query[:, :, start : start + chunk].float() * dim**-0.5
        scores = q @ key_t
        if bias is not None:
            scores += bias
        logp = torch.log_softmax(scores, dim=-1)
        # p log p in place: logp and one more chunk-sized buffer are all this step holds.
        plogp = logp.exp().mul_(logp)
        if bias is not None:
            plogp = plogp.nan_to_num_(0.0)
        total -= plogp.sum(dim=(1, 2, 3))
    return total / (heads * rows * torch.log(keys.float()))


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe measures. Block indices count the transformer's probed attention modules in forward
    order, as its family's `attention_modules` lists them (FLUX: double-stream blocks then single-stream
    blocks; SD3: joint blocks)."""

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
    return family_of_transformer(transformer).attention_modules(transformer)


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
        self._family = family_of_transformer(transformer)
        attentions = self._family.attention_modules(transformer)
        blocks = self.settings.blocks or tuple(range(len(attentions)))
        if max(blocks, default=-1) >= len(attentions):
            raise IndexError(
                f"probe blocks {blocks} out of range: the model has {len(attentions)} attention blocks"
            )
        self._sites = [(block, attentions[block]) for block in blocks]
        for block, attn in self._sites:
            try:
                self._family.check_probe_support(attn)
            except (TypeError, ValueError) as e:
                raise type(e)(f"attention block {block}: {e}") from None
            if getattr(attn, "fused_projections", False):
                raise ValueError(f"attention block {block} has fused QKV projections; unfuse them to probe it")
            if self.settings.heads and max(self.settings.heads) >= attn.heads:
                raise IndexError(f"probe heads {self.settings.heads} out of range: block {block} has "
                                 f"{attn.heads} heads")
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._rows: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._call: dict[str, Any] = {}  # the family's `probe_call` record of the current transformer call
        self._sum: torch.Tensor | None = None
        self._calls = 0

    def __enter__(self) -> AttentionEntropyProbe:
        if self._handles:
            raise RuntimeError("this probe is already installed")
        signature = inspect.signature(self.transformer.forward)

        def record_call(_: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            self._call = self._family.probe_call(signature.bind(*args, **kwargs).arguments)

        self._handles.append(self.transformer.register_forward_pre_hook(record_call, with_kwargs=True))
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

    def _hook(self, block: int, attn: nn.Module) -> Callable[[nn.Module, tuple, dict[str, Any]], None]:
        signature = inspect.signature(attn.forward)

        def rows(image_tokens: int) -> torch.Tensor:
            device = next(attn.parameters()).device
            cache_key = (block, image_tokens, device)
            if cache_key not in self._rows:
                sampled = sample_rows(self.settings.seed, block, image_tokens, self.settings.rows)
                self._rows[cache_key] = sampled.to(device)
            return self._rows[cache_key]

        @torch.no_grad()
        def hook(_: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            inputs = signature.bind(*args, **kwargs).arguments
            query, key, key_mask = self._family.probe_query_key(attn, inputs, self._call, rows,
                                                                self.settings.heads)
            self._add(attention_entropy(query, key, self.settings.chunk, key_mask))

        return hook

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


def rotate(
    query: torch.Tensor, key: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE as FLUX's and FLUX.2's processors apply it (diffusers' `apply_rotary_emb`, real cos / sin tables over
    the joint sequence, heads on dim 2): the sampled query rows at their `positions`, and every key."""
    if rotary is None:
        return query, key
    cos, sin = rotary
    query = apply_rotary_emb(query, (cos[positions], sin[positions]), sequence_dim=1)
    return query, apply_rotary_emb(key, rotary, sequence_dim=1)


def project_heads(
    attn: nn.Module, linear: nn.Module, norm: nn.Module | None, x: torch.Tensor, heads: tuple[int, ...]
) -> torch.Tensor:
    """(B, N, heads, d): a projection split into heads, the selected ones kept, then the per-head q/k norm;
    as diffusers' processors do it, except that selecting heads first skips norms whose output is not used."""
    out = linear(x).unflatten(-1, (attn.heads, -1))
    if heads:
        out = out[:, :, list(heads)]
    return norm(out) if norm is not None else out
