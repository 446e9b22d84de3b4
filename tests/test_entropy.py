"""Attention-entropy probes (egrpo.entropy): the chunked entropy against explicit softmax entropies, and the
probes on the toy FLUX checkpoint (double- and single-stream blocks, with a LoRA adapter) and on tiny SD3
transformers against entropies of the Q/K that the attention kernel itself receives."""

from pathlib import Path

import pytest
import torch
from conftest import KernelAttention
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.utils._python_dispatch import TorchDispatchMode

import egrpo.toyworld
from egrpo.entropy.attention import (
    AttentionEntropyProbe,
    ProbeSettings,
    attention_entropy,
    probed_attentions,
    sample_rows,
)
from egrpo.models.families.sd3 import build_sd3_pipeline
from egrpo.models.policy import FlowPolicy

TOY_CHECKPOINT = Path(egrpo.toyworld.__file__).parent / "checkpoint"
PROMPTS = ["a red circle", "a blue square"]
ALL_ROWS = 10_000  # more than any test model's image tokens: every image row is measured


# ------------------------------------------------------------------------------------- attention_entropy


def test_uniform_rows_have_entropy_one_and_one_hot_rows_zero() -> None:
    key = torch.randn(2, 3, 50, 8)
    assert torch.allclose(attention_entropy(torch.zeros(2, 3, 5, 8), key), torch.ones(2), atol=1e-6)
    key = torch.zeros(1, 1, 50, 8)
    key[..., 7, 0] = 100.0  # the query below scores 5000 on key 7 and 0 on every other
    query = torch.zeros(1, 1, 4, 8)
    query[..., 0] = 100.0
    assert attention_entropy(query, key).item() < 1e-6


def test_chunked_entropy_equals_explicit_softmax_entropy(kernel_attention: KernelAttention) -> None:
    generator = torch.Generator().manual_seed(0)
    query = 3 * torch.randn(3, 4, 37, 16, generator=generator)  # peaked enough to be far from 1
    key = torch.randn(3, 4, 90, 16, generator=generator)
    expected = kernel_attention.entropy(query, key)
    assert 0.2 < expected.min() and expected.max() < 0.9
    for chunk in (1, 5, 37, 1000):
        assert torch.allclose(attention_entropy(query, key, chunk), expected, atol=1e-5), chunk
    # bf16 inputs are measured in float32, so they agree with the explicit value of the same bf16 numbers
    low = attention_entropy(query.bfloat16(), key.bfloat16(), 8)
    assert low.dtype == torch.float32
    assert torch.allclose(low, kernel_attention.entropy(query.bfloat16(), key.bfloat16()), atol=1e-5)


class LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


def test_chunking_bounds_the_largest_intermediate() -> None:
    """Structural memory bound: with chunk c no op output exceeds B x heads x c x N_keys elements (the float32
    key copy, B x heads x N x d, is smaller here since d < c); unchunked, the scores reach B x heads x R x N."""
    batch, heads, rows, keys, dim, chunk = 2, 3, 256, 512, 8, 16
    query, key = torch.randn(batch, heads, rows, dim), torch.randn(batch, heads, keys, dim)
    with LargestOutput() as chunked:
        attention_entropy(query, key, chunk)
    assert chunked.numel == batch * heads * chunk * keys
    with LargestOutput() as whole:
        attention_entropy(query, key, rows)
    assert whole.numel == batch * heads * rows * keys


def test_bad_shapes_and_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        attention_entropy(torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 5, 4))
    with pytest.raises(ValueError, match="two keys"):
        attention_entropy(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match="distinct"):
        ProbeSettings(heads=(1, 1))
    with pytest.raises(ValueError, match="positive"):
        ProbeSettings(rows=0)


def test_sampled_rows_are_fixed_by_seed_and_block() -> None:
    rows = sample_rows(0, 3, 100, 10)
    assert torch.equal(rows, sample_rows(0, 3, 100, 10))
    assert len(set(rows.tolist())) == 10 and torch.equal(rows, rows.sort().values) and rows.max() < 100
    assert not torch.equal(rows, sample_rows(1, 3, 100, 10))
    assert not torch.equal(rows, sample_rows(0, 4, 100, 10))
    assert torch.equal(sample_rows(0, 3, 6, 10), torch.arange(6))


# --------------------------------------------------------------------------------------------- the probes


def hook_counts(model: torch.nn.Module) -> list[tuple[int, int]]:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


def check_probe_leaves_no_trace(model: torch.nn.Module, forward, settings: ProbeSettings) -> torch.Tensor:
    """forward() with the probe on equals forward() without it, bit for bit; afterwards the processors are the
    same objects and no hook is left. Returns the probed value."""
    processors = [attn.processor for attn in probed_attentions(model)]
    hooks = hook_counts(model)
    with torch.no_grad():
        plain = forward()
        with AttentionEntropyProbe(model, settings) as probe:
            probed = forward()
            value = probe.take()
        after = forward()
    assert torch.equal(plain, probed) and torch.equal(plain, after)
    assert all(attn.processor is p for attn, p in zip(probed_attentions(model), processors, strict=True))
    assert hook_counts(model) == hooks
    return value


@pytest.fixture(scope="module")
def flux() -> FlowPolicy:
    """The toy FLUX checkpoint (2 double-stream + 2 single-stream blocks, 4 heads, 64 image and 12 text
    tokens) with a LoRA adapter made non-zero, so the probe must use the LoRA-wrapped projections."""
    policy = FlowPolicy.from_pretrained(TOY_CHECKPOINT)
    policy.setup_finetune("lora", rank=4)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return policy


def flux_forward(policy: FlowPolicy):
    cond = policy.encode_prompts(PROMPTS)
    x = policy.initial_noise([0, 1])
    return lambda: policy.velocity(x, 0.6, cond)


def test_flux_probe_matches_explicit_entropies_of_the_kernel_inputs(
    flux: FlowPolicy, kernel_attention: KernelAttention
) -> None:
    forward = flux_forward(flux)
    image_tokens = flux.latent_shape[0]
    values = [
        check_probe_leaves_no_trace(flux.transformer, forward, ProbeSettings(blocks=(b,), rows=ALL_ROWS))
        for b in range(4)
    ]
    kernel_attention.start()
    with torch.no_grad():
        forward()
    assert len(kernel_attention.calls) == 4  # double, double, single, single
    for block, (query, key) in enumerate(kernel_attention.calls):
        # joint order [text, image] in both block types: the image rows are the last ones
        expected = kernel_attention.entropy(query[:, :, -image_tokens:], key)
        assert torch.allclose(values[block], expected, atol=1e-5), block
        assert ((0 < values[block]) & (values[block] < 1)).all()
    assert len({round(v[0].item(), 4) for v in values}) == 4  # the blocks measure different things

    # all blocks: the mean over them; sampled rows and selected heads: those rows and heads only
    with torch.no_grad(), AttentionEntropyProbe(flux.transformer, ProbeSettings(rows=ALL_ROWS)) as probe:
        forward()
        assert torch.allclose(probe.take(), torch.stack(values).mean(0), atol=1e-6)
    settings = ProbeSettings(blocks=(1, 2), heads=(0, 3), rows=5, chunk=2, seed=7)
    with torch.no_grad(), AttentionEntropyProbe(flux.transformer, settings) as probe:
        forward()
        measured = probe.take()
    expected = []
    for block in (1, 2):
        query, key = kernel_attention.calls[-4 + block]
        rows = key.shape[2] - image_tokens + sample_rows(7, block, image_tokens, 5)
        expected.append(kernel_attention.entropy(query[:, [0, 3]][:, :, rows], key[:, [0, 3]]))
    assert torch.allclose(measured, torch.stack(expected).mean(0), atol=1e-5)

    # the adapter matters, so agreeing above means the probe used the LoRA-wrapped projections
    with torch.no_grad(), flux.reference(), AttentionEntropyProbe(flux.transformer, ProbeSettings()) as probe:
        forward()
        assert not torch.allclose(probe.take(), torch.stack(values).mean(0), atol=1e-3)


def test_take_averages_calls_since_the_last_take(flux: FlowPolicy) -> None:
    cond = flux.encode_prompts(PROMPTS)
    x = flux.initial_noise([0, 1])
    settings = ProbeSettings(blocks=(0, 3), rows=16)
    with torch.no_grad(), AttentionEntropyProbe(flux.transformer, settings) as probe:
        flux.velocity(x, 0.9, cond)
        early = probe.take()
        flux.velocity(x, 0.2, cond)
        late = probe.take()
        flux.velocity(x, 0.9, cond)
        flux.velocity(x, 0.2, cond)
        assert torch.allclose(probe.take(), (early + late) / 2, atol=1e-6)
        assert not torch.allclose(early, late, atol=1e-4)
        with pytest.raises(RuntimeError, match="no probed attention call"):
            probe.take()
        flux.velocity(x, 0.9, cond)
        with pytest.raises(RuntimeError, match="batch size changed"):
            flux.velocity(x[:1], 0.9, {k: v[:1] for k, v in cond.items()})


def sd3_transformer(**config) -> SD3Transformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=3,
            joint_attention_dim=12,
            caption_projection_dim=24,
            pooled_projection_dim=10,
            out_channels=4,
            pos_embed_max_size=16,
            **config,
        ).eval()
        # random init gives nearly uniform attention; sharper Q and K make the entropies informative
        for attn in probed_attentions(model):
            for linear in (attn.to_q, attn.to_k, attn.add_k_proj):
                linear.weight.data.mul_(6)
    return model


def sd3_forward(model: SD3Transformer2DModel, text_tokens: int = 7):
    generator = torch.Generator().manual_seed(2)
    inputs = {
        "hidden_states": torch.randn(2, model.config.in_channels, 16, 16, generator=generator),
        "encoder_hidden_states": torch.randn(
            2, text_tokens, model.config.joint_attention_dim, generator=generator
        ),
        "pooled_projections": torch.randn(2, model.config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([300.0, 800.0]),
    }
    return lambda: model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("variant", ["sd3", "sd3.5"])
def test_sd3_probe_matches_explicit_entropies_of_the_kernel_inputs(
    variant: str, kernel_attention: KernelAttention
) -> None:
    # sd3.5: q/k RMS norms, and an image-only second attention in block 0 that is not probed
    config = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if variant == "sd3.5" else {}
    model = sd3_transformer(**config)
    forward = sd3_forward(model)
    image_tokens, text_tokens = 64, 7
    values = [
        check_probe_leaves_no_trace(model, forward, ProbeSettings(blocks=(b,), rows=ALL_ROWS, chunk=24))
        for b in range(2)
    ]
    kernel_attention.start()
    with torch.no_grad():
        forward()
    joint = [(q, k) for q, k in kernel_attention.calls if k.shape[2] == image_tokens + text_tokens]
    assert len(kernel_attention.calls) == (3 if variant == "sd3.5" else 2) and len(joint) == 2
    for block, (query, key) in enumerate(joint):
        expected = kernel_attention.entropy(query[:, :, :image_tokens], key)  # joint order [image, text]
        assert torch.allclose(values[block], expected, atol=1e-5), block
        assert ((0.05 < values[block]) & (values[block] < 0.95)).all()
    assert not torch.allclose(values[0], values[1], atol=1e-3)

    settings = ProbeSettings(blocks=(1,), heads=(2,), rows=9, seed=3)
    with torch.no_grad(), AttentionEntropyProbe(model, settings) as probe:
        forward()
        measured = probe.take()
    query, key = joint[1]
    rows = sample_rows(3, 1, image_tokens, 9)
    assert torch.allclose(measured, kernel_attention.entropy(query[:, [2]][:, :, rows], key[:, [2]]), atol=1e-5)


def test_tiny_sd3_pipeline_transformer_is_probed_exactly(kernel_attention: KernelAttention) -> None:
    """The SD3 preset egrpo builds (one joint block whose text stream is context_pre_only)."""
    model = build_sd3_pipeline().transformer
    generator = torch.Generator().manual_seed(3)
    inputs = {
        "hidden_states": torch.randn(1, 16, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=generator),
        "pooled_projections": torch.randn(1, 64, generator=generator),
        "timestep": torch.tensor([500.0]),
    }
    value = check_probe_leaves_no_trace(
        model, lambda: model(**inputs, return_dict=False)[0], ProbeSettings(rows=ALL_ROWS)
    )
    kernel_attention.start()
    with torch.no_grad():
        model(**inputs)
    ((query, key),) = kernel_attention.calls
    assert torch.allclose(value, kernel_attention.entropy(query[:, :, :16], key), atol=1e-5)


def test_unsupported_models_and_settings_are_refused() -> None:
    model = sd3_transformer()
    with pytest.raises(IndexError, match="out of range"):
        AttentionEntropyProbe(model, ProbeSettings(blocks=(2,)))
    with pytest.raises(IndexError, match="heads"):
        AttentionEntropyProbe(model, ProbeSettings(heads=(3,)))
    probed_attentions(model)[1].set_processor(AttnProcessor2_0())
    AttentionEntropyProbe(model, ProbeSettings(blocks=(0,)))  # the other block is still fine
    with pytest.raises(TypeError, match="AttnProcessor2_0"):
        AttentionEntropyProbe(model, ProbeSettings())
    with pytest.raises(TypeError, match="egrpo supports the transformers .*, not Linear"):
        AttentionEntropyProbe(torch.nn.Linear(2, 2), ProbeSettings())
