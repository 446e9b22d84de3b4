"""FlowPolicy on tiny real FLUX / SD3 pipelines saved to disk: loading, conditioning, latents, the ODE against
diffusers' own pipelines, and LoRA / full finetuning with their reference policies and saved weights."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from egrpo.images import to_float_images
from egrpo.models.families.flux import build_flux_pipeline
from egrpo.models.families.sd3 import build_sd3_pipeline
from egrpo.models.policy import FlowPolicy
from egrpo.models.tiny import save_pipeline
from egrpo.sampling.plans import ode_plan
from egrpo.sampling.rollout import SamplerSettings, run_plan
from egrpo.sampling.steps import NoiseSpec, sigma_schedule

SIZE = 32
QUANTUM = 0.5 / 255  # rollout images are uint8: round(x * 255)
MAX_SEQ = 16
WORDS = ["red", "blue", "circle", "square"]
PROMPTS = ["a red circle", "a blue square"]

# name -> (builder, pixel_unshuffle). The VAE FLUX has guidance embeddings (like FLUX.1-dev), the pixel one not.
BUILDERS = {
    "flux": (lambda: build_flux_pipeline(guidance_embeds=True, words=WORDS), None),
    "flux_pixel": (lambda: build_flux_pipeline(vae=False, pixel_unshuffle=2, words=WORDS), 2),
    "sd3": (build_sd3_pipeline, None),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    for name, (build, pixel_unshuffle) in BUILDERS.items():
        save_pipeline(build(), root / name, height=SIZE, width=SIZE, pixel_unshuffle=pixel_unshuffle)
    return {name: root / name for name in BUILDERS}


def load(folder: Path, **kwargs) -> FlowPolicy:
    return FlowPolicy.from_pretrained(folder, max_sequence_length=MAX_SEQ, **kwargs)


def perturb(params: list[torch.nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=generator).to(p.dtype))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_round_trip_shapes_and_decode(folders: dict[str, Path], name: str) -> None:
    policy = load(folders[name])
    assert policy.family == ("sd3" if name == "sd3" else "flux")
    assert (policy.height, policy.width) == (SIZE, SIZE)  # from egrpo.json, not the 1024 default
    if name == "flux_pixel":
        assert policy.pipe.vae is None and policy.latent_shape == (64, 48)
    rebuilt = BUILDERS[name][0]().transformer.state_dict()  # the builder is deterministic given its seed
    for key, value in policy.transformer.state_dict().items():
        assert torch.equal(value, rebuilt[key]), key

    x = policy.initial_noise([0, 1])
    assert x.shape == (2, *policy.latent_shape) and x.dtype == torch.float32
    cond = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        v = policy.velocity(x, 0.5, cond)
        v_tensor_sigma = policy.velocity(x, torch.tensor([0.5, 0.5]), cond)
        v_swapped = policy.velocity(x, 0.5, policy.encode_prompts(PROMPTS[::-1]))
        images = policy.decode(x)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert torch.equal(v, v_tensor_sigma)
    assert not torch.allclose(v, v_swapped)  # the prompt reaches the transformer
    assert images.shape == (2, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_encode_prompts_is_cached_and_equals_a_fresh_encode(folders: dict[str, Path], name: str) -> None:
    policy = load(folders[name])
    t5 = policy.pipe.text_encoder_2 if name == "flux" else policy.pipe.text_encoder_3
    calls = []
    t5.register_forward_hook(lambda *_: calls.append(1))

    cond = policy.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert len(calls) == 1  # the two new prompts, encoded in one batch
    again = policy.encode_prompts([PROMPTS[1]])
    assert len(calls) == 1
    for key, value in cond.items():
        assert value.shape[0] == 3, key
        assert torch.equal(value[0], value[2]) and torch.equal(value[1], again[key][0]), key

    if name == "flux":
        embeds, pooled, _ = policy.pipe.encode_prompt(PROMPTS[1], prompt_2=None, max_sequence_length=MAX_SEQ)
    else:
        embeds, _, pooled, _ = policy.pipe.encode_prompt(
            PROMPTS[1], None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQ
        )
    torch.testing.assert_close(again["encoder_hidden_states"][0], embeds[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(again["pooled_projections"][0], pooled[0], atol=1e-6, rtol=0)


def test_initial_noise_depends_on_its_seed_alone_and_matches_diffusers(folders: dict[str, Path]) -> None:
    policy = load(folders["flux"])
    noise = policy.initial_noise([3, 7])
    assert torch.equal(noise[1], policy.initial_noise([7])[0])
    assert not torch.equal(noise[0], noise[1])
    generators = [torch.Generator("cpu").manual_seed(s) for s in (3, 7)]
    channels = policy.transformer.config.in_channels // 4
    expected, _ = policy.pipe.prepare_latents(2, channels, SIZE, SIZE, torch.float32, "cpu", generators)
    assert torch.equal(noise, expected)


def test_pixel_latents_invert_exactly_and_vae_latents_have_the_sampler_shape(
    folders: dict[str, Path],
) -> None:
    images = torch.rand(2, 3, SIZE, SIZE)
    pixel = load(folders["flux_pixel"])
    latents = pixel.encode_images(images)
    assert latents.shape == (2, *pixel.latent_shape)
    torch.testing.assert_close(pixel.decode(latents), images, atol=1e-6, rtol=0)
    for name in ("flux", "sd3"):
        policy = load(folders[name])
        with torch.no_grad():
            assert policy.encode_images(images).shape == (2, *policy.latent_shape)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_ode_sampling_reproduces_the_diffusers_pipeline(folders: dict[str, Path], name: str) -> None:
    """egrpo's sampler (`run_plan` on an all-ODE plan) is the library's own sampling loop."""
    steps = 4
    policy = load(folders[name])
    sigmas = sigma_schedule(steps, shift=3.0)
    noise = policy.initial_noise([0, 1])
    settings = SamplerSettings(sigmas, NoiseSpec("flow_grpo", 0.7))
    result = run_plan(policy, ode_plan(PROMPTS, [0, 1], steps), settings)

    call = dict(
        prompt=PROMPTS,
        latents=noise,
        num_inference_steps=steps,
        height=SIZE,
        width=SIZE,
        max_sequence_length=MAX_SEQ,
        output_type="latent",
    )
    if policy.family == "flux":
        # FluxPipeline passes sigmas = linspace(1, 1/T, T) itself; the fixed-shift scheduler shifts them.
        call["guidance_scale"] = policy.guidance
    else:
        # SD3's default schedule is NOT egrpo's: without `sigmas` it is shift(linspace(1, ~0.003, T)) (down to
        # the scheduler's training sigma_min), not shift(linspace(1, 1/T, T)). Passing FLUX's default fixes it.
        call.update(guidance_scale=1.0, sigmas=np.linspace(1.0, 1 / steps, steps))
    expected = policy.pipe(**call).images
    torch.testing.assert_close(policy.pipe.scheduler.sigmas.double(), sigmas, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(to_float_images(result.samples["images"]), policy.decode(expected),
                                   atol=QUANTUM + 1e-5, rtol=0)
    if policy.family == "flux" and policy.pipe.vae is not None:  # the whole pipeline, decoding included
        images = policy.pipe(**{**call, "output_type": "pt"}).images
        torch.testing.assert_close(to_float_images(result.samples["images"]), images.float(),
                                   atol=QUANTUM + 1e-4, rtol=0)
    assert not torch.allclose(expected, noise, atol=0.1)  # the sampler moved


def test_lora_is_a_no_op_until_trained_then_reference_and_saved_weights_agree(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    policy = load(folders["flux"])
    x = policy.initial_noise([0, 1])
    cond = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = policy.velocity(x, 0.7, cond)

    policy.setup_finetune("lora", rank=4, alpha=8.0)  # alpha != rank: the saved scale must survive loading
    trainable = policy.trainable_parameters()
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in names)
    frozen = [policy.pipe.text_encoder, policy.pipe.text_encoder_2, policy.pipe.vae]
    assert not any(p.requires_grad for module in frozen for p in module.parameters())

    v = policy.velocity(x, 0.7, cond)
    assert torch.equal(v, base)  # the adapter starts as an exact no-op
    v.square().mean().backward()
    assert all(p.grad is not None for p in trainable)

    perturb(trainable, seed=0)
    with torch.no_grad():
        tuned = policy.velocity(x, 0.7, cond)
        with policy.reference():
            assert torch.equal(policy.velocity(x, 0.7, cond), base)
        assert torch.equal(policy.velocity(x, 0.7, cond), tuned)
    assert not torch.allclose(tuned, base, atol=1e-3)

    state = policy.trainable_state_dict()
    assert state and all(
        "lora" in k and v.device.type == "cpu" and not v.requires_grad for k, v in state.items()
    )
    perturb(trainable, seed=1)
    policy.load_trainable_state_dict(state)
    with torch.no_grad():
        assert torch.equal(policy.velocity(x, 0.7, cond), tuned)

    policy.save_weights(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = FluxPipeline.from_pretrained(folders["flux"], local_files_only=True)
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=x,
            timestep=torch.full((2,), 0.7),
            guidance=torch.full((2,), policy.guidance),
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=cond["txt_ids"][0],
            img_ids=pipe._prepare_latent_image_ids(1, SIZE // 4, SIZE // 4, "cpu", torch.float32),
            return_dict=False,
        )[0]
    torch.testing.assert_close(out, tuned, atol=1e-6, rtol=0)


def test_lora_parameters_train_in_float32_on_a_bf16_model(folders: dict[str, Path]) -> None:
    policy = load(folders["flux"], dtype=torch.bfloat16)
    x = policy.initial_noise([0])
    cond = policy.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        base = policy.velocity(x, 0.5, cond)
        policy.setup_finetune("lora", rank=2, alpha=2.0)
        assert torch.equal(policy.velocity(x, 0.5, cond), base)
    assert base.dtype == torch.float32 and policy.transformer.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())


def test_full_finetune_keeps_a_frozen_reference(folders: dict[str, Path], tmp_path: Path) -> None:
    policy = load(folders["flux_pixel"])
    x = policy.initial_noise([0, 1])
    cond = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = policy.velocity(x, 0.3, cond)

    policy.setup_finetune("full")
    with pytest.raises(RuntimeError):
        policy.setup_finetune("lora")
    trainable = policy.trainable_parameters()
    assert len(trainable) == len(list(policy.transformer.parameters()))
    perturb(trainable, seed=0)
    with torch.no_grad():
        tuned = policy.velocity(x, 0.3, cond)
        with policy.reference():
            assert torch.equal(policy.velocity(x, 0.3, cond), base)
    assert not torch.allclose(tuned, base, atol=1e-3)

    state = policy.trainable_state_dict()
    perturb(trainable, seed=1)
    policy.load_trainable_state_dict(state)
    policy.save_weights(tmp_path / "full")
    saved = FluxTransformer2DModel.from_pretrained(tmp_path / "full", local_files_only=True).state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(policy.velocity(x, 0.3, cond), tuned)
    # without a KL term or AEGPO nothing reads the reference: no copy is kept, and asking for it says so
    lean = load(folders["flux_pixel"])
    lean.setup_finetune("full", keep_reference=False)
    with pytest.raises(RuntimeError, match="no reference"), lean.reference():
        pass


def test_missing_model_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        FlowPolicy.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        FlowPolicy.from_pretrained(tmp_path / "empty")


@pytest.mark.parametrize("name, preset", [("flux", "flux"), ("sd3", "sd3")])
def test_lora_presets_adapt_attention_and_mlps_and_checkpointing_keeps_gradients(
    folders: dict[str, Path], name: str, preset: str
) -> None:
    policy = load(folders[name])
    policy.setup_finetune("lora", rank=2, alpha=2.0, targets=(preset,))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in policy.transformer.named_parameters() if ".lora_A" in n}
    # (the tiny SD3's one block is its last, which has no text-stream MLP)
    suffixes = {"to_q", "add_k_proj", "ff.net.2"} | ({"ff_context.net.0.proj", "proj_mlp"} if preset == "flux" else set())
    assert all(any(a.endswith(s) for a in adapted) for s in suffixes)
    trainable = policy.trainable_parameters()
    perturb(trainable, seed=0)
    x = policy.initial_noise([0, 1])
    cond = policy.encode_prompts(PROMPTS)

    def gradients() -> list[torch.Tensor]:
        policy.transformer.zero_grad()
        policy.velocity(x, 0.6, cond).square().mean().backward()
        return [p.grad.clone() for p in trainable]

    plain = gradients()
    policy.transformer.enable_gradient_checkpointing()
    assert policy.transformer.is_gradient_checkpointing
    for g, c in zip(plain, gradients(), strict=True):
        torch.testing.assert_close(c, g, atol=1e-6, rtol=1e-5)


def test_sd3_classifier_free_guidance_reproduces_the_pipeline(folders: dict[str, Path]) -> None:
    steps, scale = 3, 4.5
    policy = load(folders["sd3"], cfg_scale=scale)
    result = run_plan(policy, ode_plan(PROMPTS, [0, 1], steps), SamplerSettings(sigma_schedule(steps, shift=3.0),
                                                                              NoiseSpec("flow_grpo", 0.7)))
    expected = policy.pipe(prompt=PROMPTS, latents=policy.initial_noise([0, 1]), num_inference_steps=steps,
                           height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ, output_type="latent",
                           guidance_scale=scale, sigmas=np.linspace(1.0, 1 / steps, steps)).images
    with torch.no_grad():
        torch.testing.assert_close(to_float_images(result.samples["images"]), policy.decode(expected),
                                   atol=QUANTUM + 1e-5, rtol=0)
        without = run_plan(load(folders["sd3"]), ode_plan(PROMPTS, [0, 1], steps), SamplerSettings(
            sigma_schedule(steps, shift=3.0), NoiseSpec("flow_grpo", 0.7))).samples["images"]
    assert not torch.equal(without, result.samples["images"])  # guidance changed the samples
    with pytest.raises(ValueError, match="not used by flux"):
        load(folders["flux"], cfg_scale=2.0)


def test_a_policy_without_text_encoders_uses_handed_embeddings(folders: dict[str, Path]) -> None:
    for name, scale in (("flux", 1.0), ("sd3", 3.0)):
        source, lean = load(folders[name], cfg_scale=scale), load(folders[name], cfg_scale=scale)
        lean.free_text_encoders()
        with pytest.raises(RuntimeError, match="text encoders were freed"):
            lean.encode_prompts(PROMPTS)
        embeddings = source.prompt_embeddings(PROMPTS + PROMPTS[:1])
        assert list(embeddings) == PROMPTS + ([""] if scale != 1.0 else [])  # the empty prompt for CFG
        lean.add_embeddings(embeddings)
        x = source.initial_noise([0, 1])
        with torch.no_grad():
            assert torch.equal(lean.velocity(x, 0.5, lean.encode_prompts(PROMPTS)),
                               source.velocity(x, 0.5, source.encode_prompts(PROMPTS)))


def test_entropy_probe_with_classifier_free_guidance_reads_the_conditional_rows(folders: dict[str, Path]) -> None:
    from egrpo.entropy.attention import ProbeSettings
    from egrpo.sampling.rollout import ProbeRequest, probe_entropies

    steps = 3
    settings = SamplerSettings(sigma_schedule(steps, shift=3.0), NoiseSpec("flow_grpo", 0.7))
    requests = [ProbeRequest(p, k, True) for k, p in enumerate(PROMPTS)]
    guided = load(folders["sd3"], cfg_scale=3.0)
    guided.setup_finetune("lora", rank=2, alpha=2.0)
    result, anchors = probe_entropies(guided, requests, settings, ProbeSettings(rows=8), steps)
    assert result.entropy.shape == (2, steps) and torch.isfinite(result.entropy).all()
    assert torch.equal(result.entropy, result.reference)  # an untrained adapter is its reference
    # the values are those of the conditional half, not the unconditional one
    plain = load(folders["sd3"])
    plain.setup_finetune("lora", rank=2, alpha=2.0)
    assert all(a.shape[0] == steps + 1 for a in anchors.values())  # the anchors' latents at every index
    first_step = probe_entropies(plain, requests, settings, ProbeSettings(rows=8), steps)[0].entropy[:, 0]
    torch.testing.assert_close(result.entropy[:, 0], first_step)  # same input x at step 0, same prompts


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_pipeline_schedule_is_the_pipelines_own(folders: dict[str, Path], name: str, tmp_path: Path) -> None:
    """`sampler.schedule: pipeline` gives the sigmas the folder's diffusers pipeline samples with: SD3's
    scheduler spacing (down to its sigma_min), FLUX's dynamic shift by the image's tokens (FLUX.1-dev's
    scheduler config); and the ODE sampler on them reproduces the pipeline's latents."""
    import json
    import shutil

    from egrpo.config import load_config
    from egrpo.methods import schedule_sigmas

    folder = tmp_path / name
    shutil.copytree(folders[name], folder)
    if name == "flux":  # FLUX.1-dev's own scheduler: dynamic shifting from the token count
        config_file = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(config_file.read_text())
        config.update(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64)
        config_file.write_text(json.dumps(config))
    steps = 4
    cfg = load_config(None, [f"model.path={folder}", f"sampler.steps={steps}", "sampler.schedule=pipeline",
                             f"model.max_sequence_length={MAX_SEQ}"])
    sigmas = schedule_sigmas(cfg)
    assert len(sigmas) == steps + 1 and sigmas[0] == 1 and sigmas[-1] == 0
    assert not torch.allclose(sigmas, sigma_schedule(steps, 3.0))  # not egrpo's shift(1 - i/T)
    policy = load(folder)
    noise = policy.initial_noise([0, 1])
    result = run_plan(policy, ode_plan(PROMPTS, [0, 1], steps), SamplerSettings(sigmas, NoiseSpec("flow_grpo", 0.7)))
    call = dict(prompt=PROMPTS, latents=noise, num_inference_steps=steps, height=SIZE, width=SIZE,
                max_sequence_length=MAX_SEQ, output_type="latent",
                guidance_scale=policy.guidance if name == "flux" else 1.0)
    expected = policy.pipe(**call).images  # no sigmas: the pipeline chooses its own
    torch.testing.assert_close(policy.pipe.scheduler.sigmas.double(), sigmas, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(to_float_images(result.samples["images"]), policy.decode(expected),
                                   atol=QUANTUM + 1e-5, rtol=0)
