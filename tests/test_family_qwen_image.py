"""Qwen-Image (egrpo/models/families/qwen_image.py) on its tiny twin saved to disk: prompt encoding, all-ODE
sampling with and without true CFG against QwenImagePipeline itself, the pipeline's schedule, VAE encoding,
LoRA and full finetuning on the real architecture, the attention-entropy probe against the processor's own
attention inputs, and the memory plan against measured peaks."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from diffusers import QwenImageImg2ImgPipeline, QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.transformers import transformer_qwenimage

from egrpo.entropy.attention import AttentionEntropyProbe, ProbeSettings, sample_rows
from egrpo.images import to_float_images
from egrpo.memory import inference_working_set, measured_pass_peak, transformer_activations
from egrpo.models.families.qwen_image import QwenImagePolicy
from egrpo.models.policy import FlowPolicy
from egrpo.models.tiny import save_pipeline
from egrpo.sampling.plans import ode_plan
from egrpo.sampling.rollout import SamplerSettings, anchor_latents, run_plan
from egrpo.sampling.steps import NoiseSpec

SIZE = 32  # pixels; the tiny VAE downsamples 2x and the transformer packs 2x2: 8 x 8 = 64 image tokens
IMAGE_TOKENS = 64
MAX_SEQ = QwenImagePolicy.tiny_settings["max_sequence_length"]
PROMPTS = ["a red circle", "a small blue square on a green field"]  # different lengths: a text mask
QUANTUM = 0.5 / 255  # rollout images are uint8: round(x * 255)
STEPS = 4

# Qwen/Qwen-Image's published config files (no weights), as egrpo ships them
QWEN_IMAGE = Path(__file__).resolve().parents[1] / "egrpo" / "models" / "architectures" / "Qwen-Image"


def published(component: str, name: str = "config.json") -> dict:
    """A shipped config file without diffusers' metadata (_class_name, _diffusers_version)."""
    config = json.loads((QWEN_IMAGE / component / name).read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen") / "tiny"
    save_pipeline(QwenImagePolicy.tiny_pipeline(seed=0), path, height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ)
    return path


def load(folder: Path, **kwargs) -> QwenImagePolicy:
    pipe = QwenImagePipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return QwenImagePolicy(pipe, height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ, settings={}, **kwargs)


def sampled(policy: QwenImagePolicy, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """egrpo's all-ODE samples of PROMPTS from seeds 0 and 1: the final latents (its anchor trajectories) and
    the rollout's uint8 images as floats."""
    settings = SamplerSettings(sigmas, NoiseSpec("flow_grpo", 0.7))
    keys = list(zip(PROMPTS, [0, 1], strict=True))
    anchors, _, _ = anchor_latents(policy, keys, [STEPS, STEPS], settings)
    result = run_plan(policy, ode_plan(PROMPTS, [0, 1], STEPS), settings)
    return torch.stack([anchors[key][-1] for key in keys]), to_float_images(result.samples["images"])


def pipeline_call(policy: QwenImagePolicy, noise: torch.Tensor, **kwargs) -> torch.Tensor:
    return policy.pipe(prompt=PROMPTS, latents=noise, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                       max_sequence_length=MAX_SEQ, **kwargs).images


def test_from_pretrained_finds_the_family_and_the_folder_settings(folder: Path) -> None:
    policy = FlowPolicy.from_pretrained(folder)
    assert type(policy) is QwenImagePolicy
    assert (policy.height, policy.width, policy.max_sequence_length) == (SIZE, SIZE, MAX_SEQ)
    assert policy.latent_shape == (IMAGE_TOKENS, 64)
    # the pipeline's own default size: default_sample_size 128 x vae_scale_factor
    assert QwenImagePolicy.default_size({}, policy.pipe.vae_scale_factor) == 128 * policy.pipe.vae_scale_factor
    with pytest.raises(ValueError, match="multiples of 4"):
        QwenImagePolicy(policy.pipe, height=30, width=32)
    with pytest.raises(ValueError, match="at most 1024"):
        QwenImagePolicy(policy.pipe, height=32, width=32, max_sequence_length=1025)


def test_encode_equals_the_pipelines_encode_prompt(folder: Path) -> None:
    policy = load(folder)
    embeds, mask = policy.pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_SEQ)
    lengths = mask.sum(dim=1)
    assert lengths[0] < lengths[1] == embeds.shape[1]  # the pipeline pads to the batch's longest prompt
    cond = policy.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, MAX_SEQ, embeds.shape[2])
    assert cond["encoder_hidden_states_mask"].dtype == torch.bool
    assert torch.equal(cond["encoder_hidden_states_mask"][:, : embeds.shape[1]], mask.bool())
    assert not cond["encoder_hidden_states_mask"][:, embeds.shape[1]:].any()
    assert torch.equal(cond["encoder_hidden_states"][:, : embeds.shape[1]], embeds)
    assert not cond["encoder_hidden_states"][:, embeds.shape[1]:].any()
    # one prompt alone: the pipeline drops the all-ones mask; the cache holds the same states as in the batch
    alone, alone_mask = policy.pipe.encode_prompt(PROMPTS[:1], max_sequence_length=MAX_SEQ)
    assert alone_mask is None
    torch.testing.assert_close(alone[0], embeds[0, : lengths[0]], atol=1e-6, rtol=0)  # batched vs alone: rounding


def test_ode_sampling_equals_the_pipeline(folder: Path) -> None:
    """egrpo's sampler on an all-ODE plan with the pipeline's schedule is QwenImagePipeline's loop: the same
    latents (measured identical; 1e-6 allows for the Euler step's rounding: egrpo steps by a float64 sigma
    difference, the scheduler by a float32 one) and images (the rollout's are uint8)."""
    policy = load(folder)
    sigmas = QwenImagePolicy.pipeline_sigmas(dict(policy.pipe.scheduler.config), STEPS, IMAGE_TOKENS)
    noise = policy.initial_noise([0, 1])
    latents, rollout_images = sampled(policy, sigmas)
    expected = pipeline_call(policy, noise, true_cfg_scale=1.0, output_type="latent")
    assert torch.equal(policy.pipe.scheduler.sigmas.double(), sigmas)
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)
    images = pipeline_call(policy, noise, true_cfg_scale=1.0, output_type="pt")
    with torch.no_grad():
        torch.testing.assert_close(policy.decode(expected), images, atol=1e-6, rtol=0)
    torch.testing.assert_close(rollout_images, images, atol=QUANTUM + 1e-5, rtol=0)
    assert not torch.allclose(latents, noise, atol=0.1)  # the sampler moved
    # the noise is the pipeline's own: prepare_latents with one generator per seed
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    drawn = policy.pipe.prepare_latents(2, 16, SIZE, SIZE, torch.float32, policy.device, generators)
    assert torch.equal(drawn, noise)


def test_true_cfg_equals_the_pipeline_with_an_empty_negative_prompt(folder: Path) -> None:
    """cfg_scale 4 (Qwen-Image's default true_cfg_scale) is pipe(true_cfg_scale=4, negative_prompt=""). The
    pipeline runs the two halves as separate calls, the negative prompt unpadded; egrpo runs them as one batch,
    padded to the longest prompt with the padding masked out of attention (its weight is exactly 0). Only the
    float rounding of differently shaped matmuls and softmaxes differs, amplified by the scale 4: measured
    1.3e-6 on the unit-scale latents after 4 steps; 1e-5 allowed."""
    policy = load(folder, cfg_scale=4.0)
    sigmas = QwenImagePolicy.pipeline_sigmas(dict(policy.pipe.scheduler.config), STEPS, IMAGE_TOKENS)
    noise = policy.initial_noise([0, 1])
    latents, rollout_images = sampled(policy, sigmas)
    expected = pipeline_call(policy, noise, true_cfg_scale=4.0, negative_prompt="", output_type="latent")
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)
    images = pipeline_call(policy, noise, true_cfg_scale=4.0, negative_prompt="", output_type="pt")
    torch.testing.assert_close(rollout_images, images, atol=QUANTUM + 1e-5, rtol=0)

    # One velocity: the halves computed apart, combined by the pipeline's lines, with the norm rescale.
    x, cond = noise, policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        guided = policy.velocity(x, 0.6, cond)
        plain = load(folder)
        v_cond = plain.velocity(x, 0.6, cond)
        v_uncond = plain.velocity(x, 0.6, plain.encode_prompts(["", ""]))
    combined = v_uncond + 4.0 * (v_cond - v_uncond)
    expected = combined * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)
    # the rescale keeps each token's norm at the conditional prediction's; the linear rule alone does not (the
    # tiny random model's two halves are close, so the change is small, but 50x the tolerance above)
    torch.testing.assert_close(guided.norm(dim=-1), v_cond.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert (guided - combined).abs().max() > 5e-4


def test_pipeline_sigmas_follow_the_dynamic_shift_and_shift_terminal(folder: Path) -> None:
    """Qwen-Image's scheduler (dynamic exponential shift, shift_terminal 0.02) at its default 50 steps for two
    image sizes: the scheduler's sigmas after a pipeline call (stopped after its first step) are
    pipeline_sigmas."""
    policy = load(folder)
    assert dict(policy.pipe.scheduler.config).items() >= published("scheduler", "scheduler_config.json").items()

    def stop(pipe, step, timestep, tensors):
        pipe._interrupt = True
        return tensors

    schedules = []
    for size in (SIZE, 8 * SIZE):
        tokens = (size // 4) ** 2
        sigmas = QwenImagePolicy.pipeline_sigmas(dict(policy.pipe.scheduler.config), 50, tokens)
        policy.pipe(prompt=PROMPTS[0], height=size, width=size, num_inference_steps=50, true_cfg_scale=1.0,
                    output_type="latent", callback_on_step_end=stop, max_sequence_length=MAX_SEQ)
        assert torch.equal(policy.pipe.scheduler.sigmas.double(), sigmas)
        assert len(sigmas) == 51 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
        assert sigmas[-2].item() == pytest.approx(0.02, abs=1e-6)  # stretched to shift_terminal
        schedules.append(sigmas)
    assert (schedules[1][1:-2] > schedules[0][1:-2]).all()  # more tokens, more shift


def test_vae_encoding_is_the_img2img_pipelines(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """encode_images normalises the VAE posterior as QwenImageImg2ImgPipeline does, and packs it. egrpo takes
    the posterior's mode (deterministic), the img2img pipeline a sample: here its sample is made the mode."""
    policy = load(folder)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    img2img = QwenImageImg2ImgPipeline(**policy.pipe.components)
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    with torch.no_grad():
        latents = policy.encode_images(images)
        expected = img2img._encode_vae_image(images[:, :, None] * 2 - 1, generator=None)  # (B, C, 1, h, w)
    assert latents.shape == (2, *policy.latent_shape)
    torch.testing.assert_close(policy._unpack(latents), expected.transpose(1, 2), atol=0, rtol=0)
    with torch.no_grad():
        assert policy.decode(latents).shape == (2, 3, SIZE, SIZE)


def test_lora_presets_and_memory_shape_on_the_real_architecture() -> None:
    """Qwen-Image's published configs: the 60-block transformer (on the meta device), its 8x VAE, and the text
    encoder whose 3584-wide states it takes. (The transformer config's "pooled_projection_dim": 768 is no
    argument of the class, which ignores it; every other value equals the class defaults.)"""
    config = published("transformer")
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(config)
    assert QwenImagePolicy.vae_scale(published("vae"), {}) == 8
    assert published("text_encoder")["text_config"]["hidden_size"] == transformer.config.joint_attention_dim
    linears = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    assert set(QwenImagePolicy.lora_presets) == {"attention", "qwen-image"}
    for preset in QwenImagePolicy.lora_presets.values():
        for target in preset:
            matches = [name for name in linears if name.endswith("." + target)]
            assert len(matches) == 60, target  # one per block
    shape = QwenImagePolicy.memory_shape(transformer)
    assert (shape.width, shape.heads, shape.mlp_width, shape.blocks) == (3072, 24, 12288, (("joint", 60),))
    assert (shape.token_channels, shape.text_width, shape.pooled_dim) == (64, 3584, 0)
    assert shape.params == pytest.approx(20.43e9, rel=1e-3)  # Qwen-Image's 20B MMDiT


# The last block's text-stream update is discarded by the transformer (only the image stream reaches the
# output), so what only makes it (text queries and their norm, the text output projection, the text MLP) gets
# no gradient (None, or zero behind the attention kernel).
LAST_BLOCK = "transformer_blocks.1."
LAST_TEXT_OUTPUTS = ("attn.add_q_proj", "attn.norm_added_q", "attn.to_add_out", "txt_mlp")


def test_lora_and_full_finetuning_train(folder: Path) -> None:
    policy = load(folder)
    x = policy.initial_noise([0, 1])
    cond = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = policy.velocity(x, 0.7, cond)
    policy.setup_finetune("lora", rank=4, alpha=8.0, targets=("qwen-image",))
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("img_mlp" in n for n in names) and any("add_k_proj" in n for n in names)
    v = policy.velocity(x, 0.7, cond)
    assert torch.equal(v, base)  # the adapter starts as an exact no-op
    with torch.no_grad():  # move B off zero so every LoRA parameter gets a gradient
        for p in policy.trainable_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def gradients() -> dict[str, torch.Tensor]:
        policy.transformer.zero_grad(set_to_none=True)
        policy.velocity(x, 0.7, cond).square().mean().backward()
        return {n: p.grad.clone() for n, p in policy.named_trainable_parameters().items()
                if p.grad is not None and p.grad.abs().sum() > 0}

    plain = gradients()
    assert set(names) - set(plain) == {
        n for n in names if n.startswith(LAST_BLOCK) and any(m in n for m in LAST_TEXT_OUTPUTS)}
    policy.transformer.enable_gradient_checkpointing()
    checkpointed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)  # recomputation: rounding

    full = load(folder)
    full.setup_finetune("full", keep_reference=True)
    full.velocity(x, 0.7, cond).square().mean().backward()
    params = dict(full.transformer.named_parameters())
    assert all(p.requires_grad for p in params.values())
    untrained = {n for n, p in params.items() if p.grad is None or not p.grad.abs().sum()}
    assert untrained == {n for n in params if n.startswith(LAST_BLOCK) and any(m in n for m in LAST_TEXT_OUTPUTS)}


def explicit_entropy(captured: list[tuple], rows: list[torch.Tensor], text_tokens: int,
                     heads: tuple[int, ...] = ()) -> torch.Tensor:
    """Entropy from the kernel's own inputs (dispatch_attention_fn's joint query/key (B, N, H, d) and mask),
    averaged over heads, the sampled image rows (after the text rows) and the blocks."""
    per_block = []
    for (query, key, mask), sampled in zip(captured, rows, strict=True):
        q = query[:, text_tokens + sampled].transpose(1, 2)
        k = key.transpose(1, 2)
        if heads:
            q, k = q[:, list(heads)], k[:, list(heads)]
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        valid = torch.ones(key.shape[:2], dtype=torch.bool) if mask is None else mask[:, 0, 0]
        scores = scores.masked_fill(~valid[:, None, None], float("-inf"))
        p = scores.softmax(dim=-1)
        h = -(p * p.clamp_min(1e-30).log()).sum(-1) / valid.sum(1).float().log()[:, None, None]
        per_block.append(h.mean(dim=(1, 2)))
    return torch.stack(per_block).mean(0)


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1]], ids=["masked", "unmasked"])
@pytest.mark.parametrize("blocks,heads", [((), ()), ((1,), (1,))])
def test_probe_matches_the_processors_attention_and_leaves_outputs_unchanged(
    folder: Path, monkeypatch: pytest.MonkeyPatch, prompts: list[str], blocks: tuple, heads: tuple
) -> None:
    policy = load(folder)
    x = policy.initial_noise(list(range(len(prompts))))
    cond = policy.encode_prompts(prompts)
    settings = ProbeSettings(blocks=blocks, heads=heads, rows=16, seed=3)
    with torch.no_grad():
        plain = policy.velocity(x, 0.5, cond)
    captured = []
    dispatch = transformer_qwenimage.dispatch_attention_fn

    def capture(query, key, value, attn_mask=None, **kwargs):
        captured.append((query, key, attn_mask))
        return dispatch(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(transformer_qwenimage, "dispatch_attention_fn", capture)
    with torch.no_grad(), AttentionEntropyProbe(policy.transformer, settings) as probe:
        probed = policy.velocity(x, 0.5, cond)
        entropy = probe.take()
    assert torch.equal(probed, plain)  # bit-identical with the probe installed
    assert (captured[0][2] is None) == (len(prompts) == 1)  # a mask exactly when lengths differ
    text_tokens = int(cond["encoder_hidden_states_mask"].sum(1).max())
    probed_blocks = blocks or (0, 1)
    rows = [sample_rows(settings.seed, b, IMAGE_TOKENS, settings.rows) for b in probed_blocks]
    expected = explicit_entropy([captured[b] for b in probed_blocks], rows, text_tokens, heads)
    # Q is projected for the sampled rows only: float rounding of a differently shaped matmul
    torch.testing.assert_close(entropy, expected, atol=1e-5, rtol=0)
    assert ((entropy > 0) & (entropy < 1)).all()


def transformer_inputs(transformer: torch.nn.Module, rows: int, image_tokens: int, text_tokens: int,
                       dtype: torch.dtype) -> dict:
    """Random inputs of one call: a square grid of image tokens and unmasked text states."""
    side = int(image_tokens**0.5)
    c = transformer.config
    return {"hidden_states": torch.randn(rows, image_tokens, c.in_channels, dtype=dtype),
            "encoder_hidden_states": torch.randn(rows, text_tokens, c.joint_attention_dim, dtype=dtype),
            "timestep": torch.rand(rows, dtype=dtype), "img_shapes": [[(1, side, side)]] * rows, "return_dict": False}


@pytest.mark.parametrize("text_tokens,dtype", [(16, torch.float32), (160, torch.float32), (160, torch.bfloat16)])
def test_memory_estimates_match_measured_peaks(folder: Path, text_tokens: int, dtype: torch.dtype) -> None:
    """Full fine-tuning of the tiny twin's transformer (2 blocks): a rollout forward of 2 rows and learner passes
    of 1-2 rows, with and without gradient checkpointing, few and many text tokens, fp32 and bf16. Estimate /
    measured within 0.8-1.3 (the FLUX and SD3 formulas' band, tests/test_memory.py)."""
    transformer = load(folder).transformer.to(dtype).requires_grad_(True)
    shape = QwenImagePolicy.memory_shape(transformer)
    b = transformer.dtype.itemsize
    ratios = []
    for rows, training, checkpointing in [(2, False, False), (1, True, False), (2, True, False), (2, True, True)]:
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        torch.manual_seed(0)
        inputs = transformer_inputs(transformer, rows, IMAGE_TOKENS, text_tokens, dtype)
        if training:
            activations = transformer_activations(
                shape, image_tokens=IMAGE_TOKENS, text_tokens=text_tokens, rows=rows, dtype_bytes=b,
                checkpointing=checkpointing, largest_gradient_bytes=shape.largest_parameter * b)
            estimate = activations["saved"] + activations["backward"]
        else:
            estimate = rows * inference_working_set(shape, IMAGE_TOKENS, text_tokens, b)
        # QwenEmbedRope keeps its RoPE tables as plain attributes, not buffers: model state all the same
        rope = (transformer.pos_embed.pos_freqs, transformer.pos_embed.neg_freqs)
        ratios.append(estimate / measured_pass_peak(transformer, inputs, training, state=rope))
    assert all(0.8 <= r <= 1.3 for r in ratios), ratios


def test_token_counts() -> None:
    # Qwen-Image at 1328 x 1328 (8x VAE, 2x2 patches): 83 x 83 tokens
    assert QwenImagePolicy.token_counts(published("transformer"), 8, 1328, 1328, 512) == (83 * 83, 512)
