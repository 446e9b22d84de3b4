"""The Z-Image family (egrpo/models/families/z_image.py) on its tiny twin saved to disk: prompt encoding,
ODE sampling and CFG against diffusers' ZImagePipeline, the schedule, LoRA presets on the real architecture,
finetuning, the attention-entropy probe against the attention kernel's own inputs, and the memory plan
against measurement.

The tiny twin samples at 24 x 32 px: a 12 x 16 latent, 48 image tokens, which the transformer pads to 64, so
the probe's image rows and the padding are both exercised; the two prompts' chat-templated lengths (31 and 47
tokens) differ, so the transformer's batch needs its attention mask.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from diffusers.models.transformers import transformer_z_image
from torch import nn

from egrpo.entropy.attention import AttentionEntropyProbe, ProbeSettings, sample_rows
from egrpo.images import to_float_images
from egrpo.memory import inference_working_set, measured_pass_peak, transformer_activations
from egrpo.models.families.z_image import ZImagePolicy, build_z_image_pipeline
from egrpo.models.policy import FlowPolicy
from egrpo.models.tiny import save_pipeline
from egrpo.sampling.plans import ode_plan
from egrpo.sampling.rollout import SamplerSettings, anchor_latents, run_plan
from egrpo.sampling.steps import NoiseSpec

HEIGHT, WIDTH, MAX_SEQ = 24, 32, 64
IMAGE_TOKENS = (HEIGHT // 2 // 2) * (WIDTH // 2 // 2)  # the tiny VAE's 2x, then 2 x 2 patches: 48
PROMPTS = ["a red circle", "a big blue square on a table"]
SEEDS = [0, 1]
QUANTUM = 0.5 / 255  # rollout images are uint8: round(x * 255)
# float32 CPU: egrpo's sampler and the pipeline run the same ops in the same order except the Euler step's dt
# (egrpo subtracts the sigmas in float64, the scheduler in float32) and the batch layout of the CFG halves;
# the differences measured are ~1e-7, so 1e-5 bounds them with room and still fails on any real mismatch
LATENT_ATOL = 1e-5
SHIPPED = Path(__file__).resolve().parents[1] / "egrpo" / "models" / "architectures" / "Z-Image-Turbo"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("z-image") / "tiny"
    save_pipeline(build_z_image_pipeline(), path, height=HEIGHT, width=WIDTH, max_sequence_length=MAX_SEQ)
    return path


def load(folder: Path, **kwargs) -> ZImagePolicy:
    policy = FlowPolicy.from_pretrained(folder, **kwargs)
    assert type(policy) is ZImagePolicy
    return policy


def pipeline_call(policy: ZImagePolicy, steps: int, guidance_scale: float, output_type: str) -> torch.Tensor:
    """ZImagePipeline on the policy's initial noise (the pipeline's own layout: the latents are unpacked).
    The prompt list is a copy: the pipeline writes the chat-templated prompts into the list it is given."""
    return policy.pipe(prompt=list(PROMPTS), latents=policy.initial_noise(SEEDS), num_inference_steps=steps,
                       height=HEIGHT, width=WIDTH, max_sequence_length=MAX_SEQ, guidance_scale=guidance_scale,
                       output_type=output_type).images


def egrpo_samples(policy: ZImagePolicy, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(final ODE latents of the sampler's anchor pass, run_plan's uint8 images as floats, the sigmas)."""
    sigmas = ZImagePolicy.pipeline_sigmas(dict(policy.pipe.scheduler.config), steps, IMAGE_TOKENS)
    settings = SamplerSettings(sigmas, NoiseSpec("flow_grpo", 0.7))
    keys = list(zip(PROMPTS, SEEDS, strict=True))
    trajectories, _, _ = anchor_latents(policy, keys, [steps] * len(keys), settings)
    images = run_plan(policy, ode_plan(PROMPTS, SEEDS, steps), settings).samples["images"]
    return torch.stack([trajectories[key][-1] for key in keys]), to_float_images(images), sigmas


# ------------------------------------------------------------------------------------------ conditioning


def test_encoding_is_the_pipelines_padded_with_a_mask(folder: Path) -> None:
    policy = load(folder)
    assert (policy.height, policy.width, policy.max_sequence_length) == (HEIGHT, WIDTH, MAX_SEQ)
    cond = policy.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, MAX_SEQ, 32) and cond["prompt_mask"].dtype == torch.bool
    expected, negative = policy.pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False,
                                                   max_sequence_length=MAX_SEQ)
    assert negative == [] and len(expected[0]) != len(expected[1])
    for i, rows in enumerate(expected):
        mask = cond["prompt_mask"][i]
        assert int(mask.sum()) == len(rows) and bool(mask[: len(rows)].all())
        assert torch.equal(cond["prompt_embeds"][i][mask], rows)
        assert not cond["prompt_embeds"][i][~mask].any()  # zeros in the padding
    # one shape per prompt: encoded alone, a prompt's conditioning is the batch's row (the causal encoder's
    # real tokens do not see the padding; 1e-6 covers batched matmul rounding)
    alone = load(folder).encode_prompts([PROMPTS[1]])
    for key in cond:
        torch.testing.assert_close(alone[key][0], cond[key][1], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------- the pipeline


def test_ode_sampling_reproduces_the_pipeline(folder: Path) -> None:
    """Z-Image-Turbo's way: no CFG (the pipeline's guidance_scale 0)."""
    steps = 3
    policy = load(folder)
    latents, images, sigmas = egrpo_samples(policy, steps)
    expected = pipeline_call(policy, steps, 0.0, "latent")
    assert torch.equal(policy.pipe.scheduler.sigmas.double(), sigmas)  # the pipeline's own schedule
    torch.testing.assert_close(latents, expected, atol=LATENT_ATOL, rtol=0)
    decoded = pipeline_call(policy, steps, 0.0, "pt")  # the whole pipeline, its VAE decoding included
    torch.testing.assert_close(images, decoded.float(), atol=QUANTUM + 1e-4, rtol=0)
    assert not torch.allclose(expected, policy.initial_noise(SEEDS), atol=0.1)  # the sampler moved


def test_classifier_free_guidance_reproduces_the_pipeline(folder: Path) -> None:
    """The pipeline's guidance_scale g (pos + g (pos - neg), negative prompt "") is egrpo's cfg_scale g + 1."""
    steps, guidance_scale = 3, 3.0
    policy = load(folder, cfg_scale=guidance_scale + 1)
    latents, images, _ = egrpo_samples(policy, steps)
    expected = pipeline_call(policy, steps, guidance_scale, "latent")
    torch.testing.assert_close(latents, expected, atol=LATENT_ATOL, rtol=0)
    decoded = pipeline_call(policy, steps, guidance_scale, "pt")
    torch.testing.assert_close(images, decoded.float(), atol=QUANTUM + 1e-4, rtol=0)
    unguided, _, _ = egrpo_samples(load(folder), steps)
    assert not torch.allclose(unguided, latents, atol=1e-3)  # guidance changed the samples


def test_pipeline_sigmas_follow_the_scheduler_config() -> None:
    """Z-Image-Turbo's scheduler (shift 3, no dynamic shifting): shift(linspace(1, 1/T, T)) then 0. With dynamic
    shifting, mu = calculate_shift(image tokens) decides, and the pipeline's own call uses the same."""
    steps = 8
    shipped = json.loads((SHIPPED / "scheduler" / "scheduler_config.json").read_text())
    t = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64)
    closed_form = torch.cat([3 * t / (1 + 2 * t), torch.zeros(1, dtype=torch.float64)])
    # the scheduler computes in float32: 1e-6 is a few float32 ulps
    torch.testing.assert_close(ZImagePolicy.pipeline_sigmas(shipped, steps, 4096), closed_form, atol=1e-6, rtol=0)

    pipe = build_z_image_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                     max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    policy = ZImagePolicy(pipe, height=HEIGHT, width=WIDTH, max_sequence_length=MAX_SEQ, settings={})
    pipeline_call(policy, 4, 0.0, "latent")
    dynamic = ZImagePolicy.pipeline_sigmas(dict(pipe.scheduler.config), 4, IMAGE_TOKENS)
    assert torch.equal(pipe.scheduler.sigmas.double(), dynamic)
    assert not torch.allclose(dynamic, ZImagePolicy.pipeline_sigmas(dict(pipe.scheduler.config), 4, 200))


# ------------------------------------------------------------------------------------------- finetuning


def test_lora_presets_name_every_blocks_linears_on_the_real_architecture() -> None:
    """Built on the meta device from Z-Image-Turbo's published transformer config (2 noise-refiner, 2
    context-refiner and 30 main blocks): each preset entry is one nn.Linear in each of the 34 blocks."""
    config = json.loads((SHIPPED / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        real = ZImageTransformer2DModel.from_config(config)
    linears = [name for name, module in real.named_modules() if isinstance(module, nn.Linear)]
    blocks = len(real.noise_refiner) + len(real.context_refiner) + len(real.layers)
    assert blocks == 34
    for preset in ("attention", "z-image"):
        for target in ZImagePolicy.lora_presets[preset]:
            assert sum(name == target or name.endswith("." + target) for name in linears) == blocks, target
    assert set(ZImagePolicy.lora_presets["attention"]) < set(ZImagePolicy.lora_presets["z-image"])


def test_lora_starts_as_a_no_op_trains_and_checkpointing_keeps_gradients(folder: Path) -> None:
    policy = load(folder)
    x, cond = policy.initial_noise(SEEDS), policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = policy.velocity(x, 0.7, cond)
    policy.setup_finetune("lora", rank=2, alpha=2.0, targets=("z-image",))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in policy.transformer.named_parameters() if ".lora_A" in n}
    assert len(adapted) == 7 * 4  # 7 linears in each of the tiny twin's 4 blocks
    with torch.no_grad():
        assert torch.equal(policy.velocity(x, 0.7, cond), base)
    trainable = policy.named_trainable_parameters()
    assert trainable and all("lora_" in name for name in trainable)

    def gradients() -> list[torch.Tensor]:
        policy.transformer.zero_grad()
        policy.velocity(x, 0.6, cond).square().mean().backward()
        return [p.grad.clone() for p in trainable.values()]

    first = gradients()
    # B = 0 at init, so the A matrices' gradients are zero; the B matrices' are not
    assert all(g.abs().sum() > 0 for name, g in zip(trainable, first, strict=True) if "lora_B" in name)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in trainable.values():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    plain = gradients()
    assert all(g.abs().sum() > 0 for g in plain)
    policy.transformer.enable_gradient_checkpointing()
    for g, c in zip(plain, gradients(), strict=True):
        torch.testing.assert_close(c, g, atol=1e-6, rtol=1e-5)  # recomputation reorders no float op


def test_full_finetuning_trains_every_parameter(folder: Path) -> None:
    policy = load(folder)
    policy.setup_finetune("full", keep_reference=False)
    policy.velocity(policy.initial_noise(SEEDS), 0.5, policy.encode_prompts(PROMPTS)).square().mean().backward()
    missing = [n for n, p in policy.transformer.named_parameters() if not p.requires_grad or p.grad is None]
    assert missing == []  # the pad tokens too: both image and captions are padded here


# --------------------------------------------------------------------------------------------- the probe


def kernel_entropy(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor,
                   heads: list[int]) -> torch.Tensor:
    """The normalised attention entropy straight from what the processor hands the attention kernel (q, k as
    (B, N, h, d) and its (B, 1, 1, N) boolean mask): mean over heads and rows of -sum p log p / log(valid keys)."""
    q = query[:, rows][:, :, heads].float().transpose(1, 2)
    k = key[:, :, heads].float().transpose(1, 2)
    valid = torch.ones(key.shape[:2], dtype=torch.bool) if mask is None else mask.reshape(key.shape[:2])
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~valid[:, None, None], -math.inf)
    p = scores.softmax(dim=-1)
    entropy = -(p * p.log()).nan_to_num(0.0).sum(dim=-1) / valid.sum(dim=1).log()[:, None, None]
    return entropy.mean(dim=(1, 2))


def test_probe_is_the_kernels_attention_entropy(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = load(folder)
    x, cond = policy.initial_noise(SEEDS), policy.encode_prompts(PROMPTS)
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    dispatch = transformer_z_image.dispatch_attention_fn

    def recording(query, key, value, attn_mask=None, **kwargs):
        calls.append((query, key, attn_mask))
        return dispatch(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(transformer_z_image, "dispatch_attention_fn", recording)
    with torch.no_grad():
        plain = policy.velocity(x, 0.6, cond)
    main = calls[-len(policy.transformer.layers):]  # after the noise and context refiners
    assert all(mask is not None for _, _, mask in main)  # the rows' unified lengths differ

    for settings in (ProbeSettings(rows=20), ProbeSettings(blocks=(1,), heads=(1,), rows=8, seed=3)):
        with AttentionEntropyProbe(policy.transformer, settings) as probe, torch.no_grad():
            probed = policy.velocity(x, 0.6, cond)
        assert torch.equal(probed, plain)  # the probe changes nothing in the model's output
        blocks = settings.blocks or tuple(range(len(main)))
        heads = list(settings.heads) or list(range(policy.transformer.layers[0].attention.heads))
        expected = torch.stack([kernel_entropy(*main[b], sample_rows(settings.seed, b, IMAGE_TOKENS,
                                                                     settings.rows), heads)
                                for b in blocks]).mean(dim=0)
        measured = probe.take()
        # Q is projected for the sampled rows only: float32 rounding, ~1e-7
        torch.testing.assert_close(measured, expected, atol=1e-5, rtol=0)
    # the key mask matters: without it the padded row's entropy is another one
    unmasked = kernel_entropy(main[1][0], main[1][1], None, sample_rows(3, 1, IMAGE_TOKENS, 8), [1])
    assert abs(float(unmasked[0]) - float(measured[0])) > 1e-3


# -------------------------------------------------------------------------------------------- memory plan


def test_memory_shape_and_token_counts_of_the_published_model() -> None:
    config = json.loads((SHIPPED / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        shape = ZImagePolicy.memory_shape(ZImageTransformer2DModel.from_config(config))
    assert shape.params == 6_154_908_736  # egrpo/models/architectures/SOURCES.md
    assert shape.blocks == (("noise_refiner", 2), ("context_refiner", 2), ("main", 30))
    assert (shape.width, shape.heads, shape.mlp_width) == (3840, 30, 10240)
    assert (shape.token_channels, shape.text_width, shape.pooled_dim) == (64, 2560, 0)
    # 1024 px: 64 x 64 tokens; 720 x 1280: 45 x 80, which the blocks pad to 3616 (and a 500-token caption to 512)
    assert ZImagePolicy.token_counts(config, 8, 1024, 1024, 512) == (4096, 512)
    assert ZImagePolicy.token_counts(config, 8, 720, 1280, 500) == (3600, 500)
    assert ZImagePolicy.saved_elements(shape, 3600, 500, 2) == ZImagePolicy.saved_elements(shape, 3616, 512, 2)
    assert ZImagePolicy.inference_elements(shape, 3600, 500, 2) == ZImagePolicy.inference_elements(shape, 3616, 512, 2)


def test_memory_estimates_match_measured_peaks() -> None:
    """A 128-wide Z-Image transformer (4 heads of 32, one refiner layer each, two main layers), fp32, 256 image
    and 61-64 caption tokens per row: a rollout forward and learner passes, with and without checkpointing.
    The estimates are 1.01-1.11 times the measured peaks; checkpointing's is the high one, because the
    generic formula keeps every block's input at the unified length while the refiners see one part."""
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(in_channels=16, dim=128, n_layers=2, n_refiner_layers=1, n_heads=4,
                                           n_kv_heads=4, cap_feat_dim=32, axes_dims=[8, 12, 12],
                                           axes_lens=[1536, 512, 512]).eval().requires_grad_(True)
    shape = ZImagePolicy.memory_shape(transformer)
    image_tokens, text_tokens = ZImagePolicy.token_counts(dict(transformer.config), 1, 32, 32, 64)
    for rows, training, checkpointing in [(2, False, False), (1, True, False), (2, True, True)]:
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        inputs = {"x": [torch.randn(16, 1, 32, 32) for _ in range(rows)], "t": torch.rand(rows),
                  "cap_feats": [torch.randn(64 - 3 * i, 32) for i in range(rows)], "return_dict": False}
        if training:
            activations = transformer_activations(
                shape, image_tokens=image_tokens, text_tokens=text_tokens, rows=rows, dtype_bytes=4,
                checkpointing=checkpointing, largest_gradient_bytes=shape.largest_parameter * 4)
            estimate = activations["saved"] + activations["backward"]
        else:
            estimate = rows * inference_working_set(shape, image_tokens, text_tokens, 4)
        ratio = estimate / measured_pass_peak(transformer, inputs, training)
        assert 0.9 <= ratio <= 1.25, (rows, training, checkpointing, ratio)
