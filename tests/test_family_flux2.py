"""The FLUX.2 family (egrpo/models/families/flux2.py) on a tiny FLUX.2 [klein] twin saved to disk: prompt
encoding, the all-ODE sampler and CFG against diffusers' Flux2KleinPipeline, the VAE's latent normalisation, LoRA
presets on the published architectures, the entropy probe against the attention kernel's own inputs, and the
memory formulas against measured peaks."""

import math
from pathlib import Path

import pytest
import torch
from conftest import KernelAttention
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

from egrpo.entropy.attention import AttentionEntropyProbe, ProbeSettings, sample_rows
from egrpo.images import to_float_images
from egrpo.memory import (
    inference_working_set,
    measured_pass_peak,
    transformer_activations,
    transformer_shape,
)
from egrpo.models.families.flux2 import Flux2Policy, build_flux2_klein_pipeline
from egrpo.models.policy import FlowPolicy
from egrpo.models.tiny import save_pipeline
from egrpo.sampling.plans import ode_plan
from egrpo.sampling.rollout import SamplerSettings, run_plan
from egrpo.sampling.steps import NoiseSpec

SIZE, MAX_SEQ, STEPS = 32, 64, 4
DEV_SEQ = 320  # FLUX.2 [dev]'s system message is ~200 characters: tokens of the character-level tokenizer
PROMPTS = ["a red circle", "a big blue square on green grass"]  # different lengths: different padding
QUANTUM = 0.5 / 255  # rollout images are uint8: round(x * 255)
# The published transformer configs (diffusers' scripts/convert_flux2_to_diffusers.py; the klein ones also as
# their transformer/config.json). Their other entries are Flux2Transformer2DModel's defaults, which are dev's.
PUBLISHED = {
    "FLUX.2-dev": {},
    "FLUX.2-klein-4B": {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
                        "joint_attention_dim": 7680, "guidance_embeds": False},
    "FLUX.2-klein-9B": {"num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                        "joint_attention_dim": 12288, "guidance_embeds": False},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flux2") / "klein-base"
    save_pipeline(Flux2Policy.tiny_pipeline(), path, height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ)
    return path


def load(folder: Path, **kwargs) -> FlowPolicy:
    return FlowPolicy.from_pretrained(folder, **kwargs)


def test_the_folder_loads_as_its_own_pipeline_and_this_family(folder: Path) -> None:
    direct = Flux2Policy(Flux2KleinPipeline.from_pretrained(folder, local_files_only=True), height=SIZE,
                         width=SIZE, max_sequence_length=MAX_SEQ, settings={})
    policy = load(folder)
    assert type(policy) is Flux2Policy and policy.family == "flux2" and policy.klein
    assert (policy.height, policy.width, policy.max_sequence_length) == (SIZE, SIZE, MAX_SEQ)  # egrpo.json
    assert policy.latent_shape == direct.latent_shape == ((SIZE // 4) ** 2, 16)  # 2x VAE, 2x2 patches
    assert policy.pipe.config.is_distilled is False
    assert Flux2Policy.default_size(dict(policy.transformer.config), 8) == 1024


def test_encode_equals_the_pipelines_encode_prompt(folder: Path) -> None:
    policy = load(folder)
    cond = policy.encode_prompts(PROMPTS)
    embeds, text_ids = policy.pipe.encode_prompt(prompt=PROMPTS, max_sequence_length=MAX_SEQ)
    assert set(cond) == {"prompt_embeds"}
    assert cond["prompt_embeds"].shape == (2, MAX_SEQ, 48)  # 3 stacked Qwen3 layers x 16, padded to MAX_SEQ
    assert torch.equal(cond["prompt_embeds"], embeds)
    tokenizer = policy.pipe.tokenizer
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False) for p in PROMPTS]
    assert all(text.endswith("<think>\n\n</think>\n\n") for text in texts)  # thinking off, as klein renders
    lengths = [len(tokenizer(text).input_ids) for text in texts]
    assert lengths[0] < lengths[1] <= MAX_SEQ  # different lengths, neither truncated
    # one at a time (the cache) equals the batch: padding to MAX_SEQ makes every prompt's tensor one shape
    alone = load(folder).encode_prompts(PROMPTS[1:])["prompt_embeds"]
    torch.testing.assert_close(alone[0], embeds[1], atol=1e-6, rtol=0)  # float sums in another batch shape

    # the position ids the transformer gets are the pipeline's: (0, 0, 0, l) text and (0, h, w, 0) image ids
    seen = {}
    handle = policy.transformer.register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs),
                                                          with_kwargs=True)
    with torch.no_grad():
        policy.velocity(policy.initial_noise([0, 1]), 0.5, cond)
    handle.remove()
    _, image_ids = policy.pipe.prepare_latents(2, 4, SIZE, SIZE, torch.float32, "cpu", None)
    assert torch.equal(seen["txt_ids"], text_ids[0]) and torch.equal(seen["img_ids"], image_ids[0])
    assert seen["guidance"] is None  # klein has no guidance embedding input


def pipeline_call(policy: FlowPolicy, noise: torch.Tensor, **kwargs) -> dict:
    """pipe(...) arguments for egrpo's prompts and noise; guidance_scale 1 unless given (klein base's default,
    4.0, would turn on CFG)."""
    return {"prompt": PROMPTS, "latents": policy._unpack(noise), "num_inference_steps": STEPS, "height": SIZE,
            "width": SIZE, "max_sequence_length": MAX_SEQ, "guidance_scale": 1.0, **kwargs}


def final_latents(pipe: Flux2KleinPipeline, call: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the pipeline's packed latents after its last step, its output_type="latent" output)."""
    seen = {}

    def keep(_pipe, _step, _t, tensors):
        seen.update(tensors)
        return tensors

    output = pipe(**call, output_type="latent", callback_on_step_end=keep).images
    return seen["latents"], output


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_ode_sampling_and_cfg_reproduce_the_pipeline(folder: Path, cfg_scale: float) -> None:
    """egrpo's all-ODE sampler with pipeline_sigmas is Flux2KleinPipeline's loop: its latents, its decoded
    images, and with cfg_scale > 1 its CFG (guidance_scale, negative prompt "")."""
    policy = load(folder, cfg_scale=cfg_scale)
    sigmas = Flux2Policy.pipeline_sigmas(dict(policy.pipe.scheduler.config), STEPS, policy.latent_shape[0])
    result = run_plan(policy, ode_plan(PROMPTS, [0, 1], STEPS), SamplerSettings(sigmas, NoiseSpec("flow_grpo", 0.7)))
    images = to_float_images(result.samples["images"])

    noise = policy.initial_noise([0, 1])
    call = pipeline_call(policy, noise, guidance_scale=cfg_scale)
    packed, output = final_latents(policy.pipe, call)
    torch.testing.assert_close(policy.pipe.scheduler.sigmas.double(), sigmas, atol=1e-7, rtol=0)
    with torch.no_grad():
        # the pipeline's latent output is its packed latents un-normalised by the VAE's BatchNorm and
        # unpatchified: exactly what _vae_decode feeds the VAE
        mean, std = policy._bn_statistics(torch.float32)
        assert torch.equal(output, policy.pipe._unpatchify_latents(policy._unpack(packed) * std + mean))
        # egrpo's images are the pipeline's latents decoded, to uint8 rounding (+ float noise of the Euler sums)
        torch.testing.assert_close(images, policy.decode(packed), atol=QUANTUM + 1e-5, rtol=0)
    decoded = policy.pipe(**call, output_type="pt").images  # the whole pipeline, decoding included
    torch.testing.assert_close(images, decoded.float(), atol=QUANTUM + 1e-4, rtol=0)
    assert not torch.allclose(packed, noise, atol=0.1)  # the sampler moved
    if cfg_scale != 1.0:  # guidance changed the samples
        plain = final_latents(policy.pipe, pipeline_call(policy, noise))[0]
        assert not torch.allclose(plain, packed, atol=1e-3)


def test_step_distilled_klein_takes_no_cfg_and_matches_its_pipeline() -> None:
    pipe = build_flux2_klein_pipeline(is_distilled=True)
    with pytest.raises(ValueError, match="step-distilled"):
        Flux2Policy(pipe, height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ, cfg_scale=2.0)
    policy = Flux2Policy(pipe, height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ)
    sigmas = Flux2Policy.pipeline_sigmas(dict(pipe.scheduler.config), STEPS, policy.latent_shape[0])
    result = run_plan(policy, ode_plan(PROMPTS, [0, 1], STEPS), SamplerSettings(sigmas, NoiseSpec("flow_grpo", 0.7)))
    # the pipeline ignores its default guidance_scale (4.0) for a distilled model
    call = pipeline_call(policy, policy.initial_noise([0, 1]), guidance_scale=4.0)
    packed, _ = final_latents(pipe, call)
    with torch.no_grad():
        torch.testing.assert_close(to_float_images(result.samples["images"]), policy.decode(packed),
                                   atol=QUANTUM + 1e-5, rtol=0)


def test_dev_branch_reproduces_flux2_pipeline_with_embedded_guidance() -> None:
    """FLUX.2 [dev]'s pipeline (Flux2Pipeline: embedded guidance, its system message, layers 10, 20, 30) around
    the tiny klein parts with a guidance embedding: a real Mistral3 + Pixtral processor twin cannot be built
    here (PixtralProcessor needs torchvision), but Flux2Pipeline only asks its tokenizer for a chat template
    over [system, user] messages and its encoder for hidden states, which the Qwen3 twin gives."""
    klein = build_flux2_klein_pipeline(guidance_embeds=True, text_layers=31)
    pipe = Flux2Pipeline(scheduler=klein.scheduler, vae=klein.vae, text_encoder=klein.text_encoder,
                         tokenizer=klein.tokenizer, transformer=klein.transformer)
    with pytest.raises(ValueError, match="guidance-distilled"):
        Flux2Policy(pipe, height=SIZE, width=SIZE, max_sequence_length=DEV_SEQ, cfg_scale=2.0)
    policy = Flux2Policy(pipe, height=SIZE, width=SIZE, max_sequence_length=DEV_SEQ, guidance=2.5)
    assert not policy.klein
    embeds, _ = pipe.encode_prompt(prompt=PROMPTS, max_sequence_length=DEV_SEQ)
    assert torch.equal(policy.encode_prompts(PROMPTS)["prompt_embeds"], embeds)
    assert not torch.allclose(embeds[0], embeds[1], atol=1e-3)  # the prompts themselves were not truncated
    sigmas = Flux2Policy.pipeline_sigmas(dict(pipe.scheduler.config), STEPS, policy.latent_shape[0])
    result = run_plan(policy, ode_plan(PROMPTS, [0, 1], STEPS), SamplerSettings(sigmas, NoiseSpec("flow_grpo", 0.7)))
    noise = policy.initial_noise([0, 1])
    call = {**pipeline_call(policy, noise, guidance_scale=2.5), "max_sequence_length": DEV_SEQ}
    packed = pipe(**call, output_type="latent").images  # Flux2Pipeline returns the packed latents themselves
    with torch.no_grad():
        torch.testing.assert_close(to_float_images(result.samples["images"]), policy.decode(packed),
                                   atol=QUANTUM + 1e-5, rtol=0)
        other = pipe(**{**call, "guidance_scale": 6.0}, output_type="latent").images
    assert not torch.allclose(other, packed, atol=1e-3)  # the guidance value reaches the transformer


def test_vae_encoding_is_the_pipelines_normalised_patchified_mode(folder: Path) -> None:
    policy = load(folder)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = policy.encode_images(images)
        expected = policy.pipe._pack_latents(policy.pipe._encode_vae_image(images * 2 - 1, generator=None))
        assert latents.shape == (2, *policy.latent_shape)
        torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)
        # and decode inverts the normalisation the encoder applies: decode(encode(x)) = the VAE's round trip
        vae = policy.pipe.vae
        round_trip = vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample
        torch.testing.assert_close(policy.decode(latents), (round_trip / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps,tokens", [(4, 4), (28, 4096), (50, 5000)])
def test_pipeline_sigmas_are_the_schedulers_with_the_empirical_mu(folder: Path, steps: int, tokens: int) -> None:
    """The klein pipeline's own schedule at real image sizes (4096 tokens: 1024 px; > 4300: the linear fit)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    config = dict(load(folder).pipe.scheduler.config)
    sigmas = Flux2Policy.pipeline_sigmas(config, steps, tokens)
    assert sigmas.dtype == torch.float64 and len(sigmas) == steps + 1 and sigmas[-1] == 0
    # the exponential time shift of linspace(1, 1/T, T) by mu, recomputed here
    mu = compute_empirical_mu(tokens, steps)
    t = torch.linspace(1, 1 / steps, steps, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    torch.testing.assert_close(sigmas[:-1], shifted, atol=1e-6, rtol=0)  # the scheduler keeps float32


# ---------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_lora_presets_name_linears_of_the_published_architectures(name: str) -> None:
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel.from_config(PUBLISHED[name])
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    singles = transformer.config.num_single_layers
    for preset in ("attention", "flux2"):
        for entry in Flux2Policy.lora_modules((preset,)):
            matched = [n for n in linears if n == entry or n.endswith("." + entry)]
            beyond = entry.startswith("single_transformer_blocks.") and int(entry.split(".")[1]) >= singles
            # the per-block names cover dev's 48 single blocks; klein's smaller models lack the last ones
            assert bool(matched) != beyond, (name, preset, entry)
    attention = set(Flux2Policy.lora_modules(("attention",)))
    assert attention < set(Flux2Policy.lora_modules(("flux2",)))


def velocity_and_grads(policy: FlowPolicy, x: torch.Tensor, cond: dict) -> tuple[torch.Tensor, list]:
    v = policy.velocity(x, 0.7, cond)
    v.square().mean().backward()
    grads = [p.grad.clone() for p in policy.trainable_parameters()]
    policy.transformer.zero_grad(set_to_none=True)
    return v.detach(), grads


def test_lora_is_a_no_op_that_trains_and_checkpointing_gives_the_same_gradients(folder: Path) -> None:
    policy = load(folder)
    x, cond = policy.initial_noise([0, 1]), policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = policy.velocity(x, 0.7, cond)
    policy.setup_finetune("lora", rank=4, alpha=8.0, targets=("flux2",))
    adapted = {n.split(".lora_")[0] for n, p in policy.transformer.named_parameters() if p.requires_grad}
    assert any(n.endswith("attn.to_qkv_mlp_proj") for n in adapted)
    assert any(n.endswith("single_transformer_blocks.0.attn.to_out") for n in adapted)
    assert any(n.endswith("ff_context.linear_in") for n in adapted)
    v, grads = velocity_and_grads(policy, x, cond)
    assert torch.equal(v, base)  # B = 0: an exact no-op
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    # lora_B gets gradient (lora_A's is 0 while B = 0)
    assert all(g.abs().sum() > 0 for n, g in zip(names, grads, strict=True) if "lora_B" in n)
    policy.transformer.enable_gradient_checkpointing()
    _, checkpointed = velocity_and_grads(policy, x, cond)
    for g, c in zip(grads, checkpointed, strict=True):
        torch.testing.assert_close(c, g, atol=1e-6, rtol=1e-5)  # recomputed forward: the same float ops


def test_full_finetuning_trains_every_parameter(folder: Path) -> None:
    policy = load(folder)
    policy.setup_finetune("full")
    x, cond = policy.initial_noise([0, 1]), policy.encode_prompts(PROMPTS)
    _, grads = velocity_and_grads(policy, x, cond)
    names = [n for n, _ in policy.transformer.named_parameters()]
    assert len(grads) == len(names)
    assert all(g.abs().sum() > 0 for g in grads)  # klein has no guidance embedder: every parameter is used


# ------------------------------------------------------------------------------------------------------ probe


def test_probe_equals_the_entropy_of_the_kernels_own_query_and_key(
    folder: Path, kernel_attention: KernelAttention
) -> None:
    """With a non-zero LoRA adapter on every projection (the fused single-block one included), so the probe must
    read the adapted columns of to_qkv_mlp_proj."""
    policy = load(folder)
    policy.setup_finetune("lora", rank=4, targets=("flux2",))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    cond, x = policy.encode_prompts(PROMPTS), policy.initial_noise([0, 1])
    image_tokens = policy.latent_shape[0]
    transformer = policy.transformer

    def forward() -> torch.Tensor:
        return policy.velocity(x, 0.6, cond)

    all_rows = image_tokens
    values = []
    with torch.no_grad():
        plain = forward()
        for block in range(2):  # the double-stream block, then the single-stream one
            with AttentionEntropyProbe(transformer, ProbeSettings(blocks=(block,), rows=all_rows)) as probe:
                assert torch.equal(forward(), plain)  # the probe leaves the output bit-identical
                values.append(probe.take())
        assert torch.equal(forward(), plain)
    assert all(len(m._forward_pre_hooks) == 0 for m in transformer.modules())
    kernel_attention.start()
    with torch.no_grad():
        forward()
    assert len(kernel_attention.calls) == 2
    for block, (query, key) in enumerate(kernel_attention.calls):
        assert key.shape[2] == MAX_SEQ + image_tokens  # [text, image] joint keys, every text token
        expected = kernel_attention.entropy(query[:, :, -image_tokens:], key)
        torch.testing.assert_close(values[block], expected, atol=1e-5, rtol=0)  # Q re-projected: float noise
        assert ((0 < values[block]) & (values[block] < 1)).all()
    assert not torch.allclose(values[0], values[1], atol=1e-3)

    # sampled rows and one head: those rows of that head only, both blocks averaged
    settings = ProbeSettings(heads=(1,), rows=5, chunk=2, seed=3)
    with torch.no_grad(), AttentionEntropyProbe(transformer, settings) as probe:
        forward()
        measured = probe.take()
    expected = []
    for block, (query, key) in enumerate(kernel_attention.calls[:2]):  # the unprobed call's kernel inputs
        rows = MAX_SEQ + sample_rows(3, block, image_tokens, 5)
        expected.append(kernel_attention.entropy(query[:, [1]][:, :, rows], key[:, [1]]))
    torch.testing.assert_close(measured, torch.stack(expected).mean(0), atol=1e-5, rtol=0)

    # the adapter matters, so agreeing above means the probe used the LoRA-adapted projections
    with torch.no_grad(), policy.reference(), AttentionEntropyProbe(transformer, ProbeSettings()) as probe:
        forward()
        assert not torch.allclose(probe.take(), torch.stack(values).mean(0), atol=1e-3)


def test_probe_refuses_processors_it_does_not_mirror(folder: Path) -> None:
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor

    transformer = load(folder).transformer
    transformer.transformer_blocks[0].attn.set_processor(Flux2KVAttnProcessor())
    with pytest.raises(TypeError, match="block 0"):
        AttentionEntropyProbe(transformer, ProbeSettings())


# ----------------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_estimates_match_measured_peaks(dtype: torch.dtype) -> None:
    """Full fine-tuning of a tiny FLUX.2 transformer (2 double + 2 single blocks, 2 heads x 32): a rollout
    forward and learner passes, with and without checkpointing, within tests/test_memory.py's tolerance."""
    pipe = build_flux2_klein_pipeline(num_layers=2, num_single_layers=2, attention_head_dim=32)
    transformer = pipe.transformer.to(dtype).requires_grad_(True)
    image_tokens, text_tokens = Flux2Policy.token_counts(dict(transformer.config), 2, 32, 32, 48)
    assert image_tokens == 64
    shape = transformer_shape(transformer)
    assert shape.blocks == (("joint", 2), ("single", 2)) and shape.mlp_width == 3 * shape.width
    b = dtype.itemsize
    for rows, training, checkpointing in [(2, False, False), (1, True, False), (2, True, False), (2, True, True)]:
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        generator = torch.Generator().manual_seed(rows)
        inputs = dict(
            hidden_states=torch.randn(rows, image_tokens, 16, generator=generator).to(dtype),
            encoder_hidden_states=torch.randn(rows, text_tokens, 48, generator=generator).to(dtype),
            timestep=torch.rand(rows, generator=generator).to(dtype), img_ids=torch.zeros(image_tokens, 4),
            txt_ids=torch.zeros(text_tokens, 4), return_dict=False)
        if training:
            activations = transformer_activations(
                shape, image_tokens=image_tokens, text_tokens=text_tokens, rows=rows, dtype_bytes=b,
                checkpointing=checkpointing, largest_gradient_bytes=shape.largest_parameter * b)
            estimate = activations["saved"] + activations["backward"]
        else:
            estimate = rows * inference_working_set(shape, image_tokens, text_tokens, b)
        ratio = estimate / measured_pass_peak(transformer, inputs, training)
        assert 0.8 <= ratio <= 1.3, (dtype, rows, training, checkpointing, ratio)
