"""Mimicry simulations: SDEdit maths (and its off-by-one fix), pipelines and concept learning.

The tiny random model proves plumbing (shapes, files, seeds), never mimicry quality.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from typer.testing import CliRunner

from mimicshield import mimicry as M
from mimicshield.cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")


def _sd_alphas_cumprod() -> torch.Tensor:
    """The SD 1.x "scaled_linear" schedule: betas linear in sqrt space, 0.00085 -> 0.012."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


@dataclass
class OracleModel:
    """Predicts the true noise whatever it is asked, and records the timesteps it is asked at."""

    noise: torch.Tensor
    alphas_cumprod: torch.Tensor = field(default_factory=_sd_alphas_cumprod)
    seen: list[int] = field(default_factory=list)

    def predict_noise(self, z_t, t, cond):
        self.seen.append(int(t[0]))
        return self.noise


# --- maths -------------------------------------------------------------------------------------


def test_ddim_schedule_is_the_leading_sd_schedule():
    steps = M.ddim_timesteps(100)
    assert steps[:3] == [1, 11, 21] and steps[-1] == 991 and len(steps) == 100
    assert M.sdedit_timesteps(0.1) == [91, 81, 71, 61, 51, 41, 31, 21, 11, 1]
    assert M.sdedit_timesteps(0.01) == [1]
    assert M.sdedit_timesteps(0.3)[0] == 291 and len(M.sdedit_timesteps(0.3)) == 30
    with pytest.raises(ValueError):
        M.sdedit_timesteps(0.0)


def test_predict_x0_inverts_add_noise_and_ddim_to_one_is_x0():
    generator = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3)
    z_t = M.add_noise(z0, noise, 0.3)
    torch.testing.assert_close(M.predict_x0(z_t, noise, 0.3), z0)
    torch.testing.assert_close(M.ddim_step(z_t, noise, 0.3, 1.0), z0)
    # with the true noise, DDIM stays on the trajectory: z at abar_prev
    torch.testing.assert_close(M.ddim_step(z_t, noise, 0.3, 0.7), M.add_noise(z0, noise, 0.7))


@pytest.mark.parametrize("multistep", [False, True])
def test_sdedit_denoises_from_the_timestep_the_noise_was_added_at(multistep):
    """The reference adds noise at t_k and starts denoising at t_(k-1); we start at t_k.

    Proof by oracle: a model that returns the exact noise recovers z0 only if the first UNet
    call sees the timestep (so abar) at which the noise was added.
    """
    generator = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(1, 4, 4, 4, generator=generator), torch.randn(1, 4, 4, 4)
    model = OracleModel(noise)
    timesteps = M.sdedit_timesteps(0.2)
    out = M.sdedit_latents(model, z0, noise, None, timesteps, multistep=multistep)

    assert model.seen[0] == timesteps[0] == 191
    assert model.seen == (timesteps if multistep else timesteps[:1])
    torch.testing.assert_close(out, z0, atol=1e-4, rtol=1e-4)

    # The off-by-one (noise at 191, first denoising step at 181) does not recover z0.
    z_t = M.add_noise(z0, noise, model.alphas_cumprod[191])
    shifted = M.predict_x0(z_t, noise, model.alphas_cumprod[181])
    assert (shifted - z0).abs().max() > 1e-3


@pytest.mark.parametrize("resolution", [32, 0])
def test_a_mask_file_is_fitted_as_its_image_is(tmp_path, resolution):
    """A 3:2 image with its right third white, and its mask: after fitting, the same pixels."""
    from PIL import Image

    image = torch.zeros(3, 64, 100)
    image[:, :, 66:] = 1
    Image.fromarray((image[0].numpy() * 255).astype("uint8")).save(tmp_path / "mask.png")
    fitted = M.fit_image(image, resolution)
    mask = M.load_mask(tmp_path / "mask.png", *fitted.shape[1:], resolution)
    assert torch.equal(mask, (fitted[:1] > 0.5).float())
    # a mask drawn at half the size still lands on the same region
    Image.fromarray((image[0, ::2, ::2].numpy() * 255).astype("uint8")).save(tmp_path / "s.png")
    small = M.load_mask(tmp_path / "s.png", *fitted.shape[1:], resolution)
    assert (small != mask).float().mean() < 0.05


def test_centered_ellipse_mask_keeps_the_centre():
    mask = M.centered_ellipse_mask(32, 48, keep=0.5)
    assert mask.shape == (1, 32, 48)
    assert mask[0, 16, 24] == 0 and mask[0, 0, 0] == 1 and mask[0, 16, 0] == 1
    assert 0.75 < mask.mean() < 0.85  # 1 - pi/4 * 0.5 * 0.5 = 0.80


def test_fit_image_and_scenario_parsing():
    image = torch.rand(3, 40, 60)
    assert M.fit_image(image, 32).shape == (3, 32, 32)
    assert M.fit_image(image, 0).shape == (3, 40, 56)
    assert M.parse_scenarios(["sdedit", "ti,lora"]) == [
        "sdedit-onestep",
        "sdedit-ddim",
        "textual-inversion",
        "lora",
    ]
    with pytest.raises(ValueError, match="Unknown scenario"):
        M.parse_scenarios(["sdedit,nope"])
    settings = M.MimicrySettings(scenarios=["sdedit-ddim", "inpaint"], sdedit_strengths=(0.05, 0.1))
    assert [v.key for v in settings.variants()] == [
        "sdedit-ddim@0.05",
        "sdedit-ddim@0.1",
        "inpaint",
    ]


def test_betas_round_trip_the_schedule():
    abar = _sd_alphas_cumprod()
    betas = M.betas_from_alphas_cumprod(abar)
    torch.testing.assert_close(torch.cumprod(1 - betas.double(), 0).float(), abar)


# --- the tiny model ----------------------------------------------------------------------------


@pytest.fixture
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 32, 32, generator=generator)


def test_sdedit_on_the_tiny_model_is_seeded(tiny_model_with_decoder, images):
    model = tiny_model_with_decoder
    calls = []
    out = M.sdedit(model, images, 0.05, seed=7, callback=lambda s, t: calls.append((s, t)))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert calls == [(i, 5) for i in range(1, 6)]
    # same seed, same result; and each image has its own generator, so the batch around it
    # does not matter
    torch.testing.assert_close(M.sdedit(model, images[1:], 0.05, seed=7), out[1:])
    one_step = M.sdedit(model, images, 0.05, multistep=False, seed=7)
    assert one_step.shape == images.shape and not torch.equal(one_step, out)
    other_seed = M.sdedit(model, images, 0.05, multistep=False, seed=8)
    assert not torch.equal(other_seed, one_step)


def test_the_one_step_sdedit_noises_at_strength_times_t():
    """The paper's code predicts x̂0 at t = 1000 s (the DDIM grid would give 1 for 0.01)."""
    assert [M.one_step_timestep(s) for s in M.SDEDIT_STRENGTHS] == [10, 50, 100, 200, 300]
    assert M.one_step_timestep(1.0) == 999 and M.one_step_timestep(1e-4) == 1
    assert M.one_step_timestep(0.5, num_train_timesteps=500) == 250
    with pytest.raises(ValueError, match="strength"):
        M.one_step_timestep(0.0)


def test_one_step_sdedit_is_the_x0_prediction_under_the_prompt(tiny_model_with_decoder, images):
    """Computed here with the raw diffusers networks: noise E(x) at t = 50, one conditional
    UNet call (no guidance), x̂0, decode."""
    model = tiny_model_with_decoder
    got = M.sdedit(model, images, 0.05, multistep=False, prompt="a painting", seed=7)

    with torch.no_grad():
        z0 = model.vae.encode(images * 2 - 1).latent_dist.mean * model.vae.config.scaling_factor
        noise = torch.stack(
            [torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(7)) for _ in z0]
        )
        abar = model.alphas_cumprod[50]
        z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
        ids = model.tokenizer(
            "a painting",
            padding="max_length",
            max_length=model.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        cond = model.text_encoder(ids)[0].expand(len(z0), -1, -1)
        t = torch.full((len(z0),), 50)
        eps = model.unet(z_t, t, encoder_hidden_states=cond).sample
        x0_hat = (z_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        want = model.vae.decode(x0_hat / model.vae.config.scaling_factor).sample
    torch.testing.assert_close(got, ((want + 1) / 2).clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_mimicry_conditions_sdedit_on_its_prompt(tiny_model_with_decoder, images):
    """As the reference conditions SDEdit on its attack prompt; `mimic --prompt` reaches it."""
    model = tiny_model_with_decoder
    variant = M.Variant("sdedit-onestep", 0.05)
    settings = M.MimicrySettings(scenarios=["sdedit-onestep"], prompt="a painting", seed=7)
    out = M.Mimicry(model, settings).run(variant, images[0])
    want = M.sdedit(model, images[:1], 0.05, multistep=False, prompt="a painting", seed=7)[0]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    default = M.sdedit(model, images[:1], 0.05, multistep=False, seed=7)[0]
    assert not torch.equal(out, default)  # "a photo" is another condition


def test_mimicry_needs_the_decoder(tiny_model, images):
    with pytest.raises(ValueError, match="with_decoder=True"):
        M.sdedit(tiny_model, images, 0.1)


def test_img2img_and_inpaint_pipelines(tiny_model_with_decoder, tmp_path, images):
    from mimicshield.models import load_models
    from mimicshield.testing import save_tiny_inpainting_model

    model = tiny_model_with_decoder
    out = M.img2img(model, images, 0.5, num_inference_steps=2, seed=1)
    assert out.shape == images.shape
    torch.testing.assert_close(M.img2img(model, images, 0.5, num_inference_steps=2, seed=1), out)

    inpainter = load_models(
        str(save_tiny_inpainting_model(tmp_path / "inpaint")),
        device="cpu",
        dtype="fp32",
        inpainting=True,
        with_decoder=True,
    )
    assert inpainter.unet.config.in_channels == 9
    painted = M.inpaint(inpainter, images[:1], num_inference_steps=2)
    assert painted.shape == (1, 3, 32, 32)
    legacy = M.inpaint(model, images[:1], num_inference_steps=2)  # a 4-channel UNet works too
    assert legacy.shape == (1, 3, 32, 32)


def test_lora_without_peft_is_refused_before_any_scenario_runs(tiny_model, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    with pytest.raises(ImportError, match="needs peft"):
        M.Mimicry(tiny_model, M.MimicrySettings(scenarios=["sdedit-onestep", "lora"]))
    M.Mimicry(tiny_model, M.MimicrySettings(scenarios=["sdedit-onestep"]))  # without lora: fine


def test_training_on_no_images_is_refused_not_an_endless_loop():
    with pytest.raises(ValueError, match="at least one image"):
        next(M._batches(0, 1, 1, torch.Generator().manual_seed(0)))


def test_textual_inversion_varies_its_prompt_and_flips_images_as_attackers_do(
    tiny_model_with_decoder, images, monkeypatch
):
    """Each step: one of the templates, and the image flipped half the time; and the embedding
    that comes out is the new token's row moved from its start."""
    model = tiny_model_with_decoder
    prompts, seen = [], []
    conditioning, loss = M._ti_conditioning, M._denoising_loss

    def spy_conditioning(model, placeholders, ids, size):
        prompts.append(tuple(ids[0].flatten().tolist()))
        return conditioning(model, placeholders, ids, size)

    def spy_loss(model, chosen, cond, generator):
        seen.append(chosen.clone())
        return loss(model, chosen, cond, generator)

    monkeypatch.setattr(M, "_ti_conditioning", spy_conditioning)
    monkeypatch.setattr(M, "_denoising_loss", spy_loss)
    start = (
        model.text_encoder.get_input_embeddings()
        .weight[model.tokenizer.convert_tokens_to_ids("art")]
        .clone()
    )
    schedule = M.TrainingSchedule(steps=16, learning_rate=1e-2, batch_size=2)
    _, embedding = M.textual_inversion_mimicry(
        model, images, schedule, num_samples=1, num_inference_steps=1
    )
    assert len(set(prompts)) > 3  # several phrasings of the token
    per_image = [
        bool(torch.equal(x[i], images[j].flip(-1)))
        for x in seen
        for i in range(2)
        for j in range(2)
        if torch.equal(x[i], images[j].flip(-1)) or torch.equal(x[i], images[j])
    ]
    assert len(per_image) == 2 * len(seen)  # each image as it is or mirrored, nothing else
    assert 0 < sum(per_image) < len(per_image)  # both happen
    assert not torch.allclose(embedding, start)  # the new row learned


def test_textual_inversion_and_lora_leave_the_model_unchanged(tiny_model_with_decoder, images):
    model = tiny_model_with_decoder
    vocabulary = len(model.tokenizer)
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    schedule = M.TrainingSchedule(steps=2, learning_rate=1e-2)

    steps = []
    samples, embedding = M.textual_inversion_mimicry(
        model,
        images,
        schedule,
        num_samples=2,
        num_inference_steps=2,
        callback=lambda s, t: steps.append(s),
    )
    assert samples.shape == (2, 3, 32, 32) and embedding.shape == (32,)
    assert steps == [1, 2]
    assert len(model.tokenizer) == vocabulary

    samples, weights = M.lora_mimicry(
        model, images, schedule, rank=2, num_samples=1, num_inference_steps=2
    )
    assert samples.shape == (1, 3, 32, 32)
    assert weights and all("lora" in name for name in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # it learned
    after = model.unet.state_dict()
    assert after.keys() == unet_before.keys()
    assert all(torch.equal(after[k], unet_before[k]) for k in after)


def test_lora_repeats_with_its_seed_whatever_the_global_rng(
    tiny_model_with_decoder, images, monkeypatch
):
    # peft draws the adapter's start from torch's global RNG: the run's seed must decide it,
    # and the caller's global state must come back as it was
    schedule = M.TrainingSchedule(steps=1, learning_rate=1e-2, seed=5)
    # the GPUs' generators are not forked: the run must not reseed them
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: pytest.fail("GPU reseeded"))
    runs = []
    for global_seed in (1, 2):
        torch.default_generator.manual_seed(global_seed)
        expected = torch.random.get_rng_state()
        _, weights = M.lora_mimicry(
            tiny_model_with_decoder, images, schedule, rank=2, num_samples=1, num_inference_steps=1
        )
        assert torch.equal(torch.random.get_rng_state(), expected)
        runs.append(weights)
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_mimic_cli_writes_outputs(tiny_model_dir, tmp_path):
    from PIL import Image

    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg"):
        Image.new("RGB", (40, 32), (200, 80, 30)).save(inputs / name)
    out = tmp_path / "out"
    args = ["mimic", str(inputs), "-o", str(out), "--model", str(tiny_model_dir)]
    args += ["--device", "cpu", "--dtype", "fp32", "-s", "sdedit-ddim", "--strengths", "0.02"]
    args += ["--resolution", "32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert Image.open(out / "sdedit-ddim@0.02" / "a.png").size == (32, 32)
    assert (out / "sdedit-ddim@0.02" / "sub" / "b.png").is_file()
    record = json.loads((out / "mimic.json").read_text())
    assert record["settings"]["scenarios"] == ["sdedit-ddim"] and len(record["outputs"]) == 2

    bad = CliRunner().invoke(app, [*args[:4], "-s", "nope"])
    assert bad.exit_code != 0 and "Unknown scenario 'nope'" in str(bad.exception)

    # a broken file is left out and reported; the readable images are still mimicked
    (inputs / "broken.png").write_bytes(b"")
    partial_args = ["mimic", str(inputs), "-o", str(tmp_path / "p"), *args[4:]]
    partial = CliRunner().invoke(app, partial_args, env={"COLUMNS": "200"})
    assert partial.exit_code == 1, partial.output
    assert "1 input(s) left out" in partial.output and "broken.png: empty file" in partial.output
    assert (tmp_path / "p" / "sdedit-ddim@0.02" / "a.png").is_file()
    assert len(json.loads((tmp_path / "p" / "mimic.json").read_text())["failed"]) == 1

    # a rerun into the same folder is refused before the model loads, and loses nothing
    (inputs / "broken.png").unlink()
    before = (out / "sdedit-ddim@0.02" / "a.png").read_bytes()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "exist already" in str(again.exception)
    assert (out / "sdedit-ddim@0.02" / "a.png").read_bytes() == before
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0

    # a.jpg beside a.png: one output name, so the second is refused, not written over the first
    Image.new("RGB", (40, 32), (10, 80, 30)).save(inputs / "a.jpg")
    clash_args = ["mimic", str(inputs), "-o", str(tmp_path / "c"), *args[4:]]
    clash = CliRunner().invoke(app, clash_args, env={"COLUMNS": "200"})
    assert clash.exit_code == 1 and "same output name" in clash.output
    record = json.loads((tmp_path / "c" / "mimic.json").read_text())
    assert len(record["outputs"]) == 2 and len(record["failed"]) == 1


def test_bad_strengths_are_named_in_the_error():
    from mimicshield.cli.errors import CLIError
    from mimicshield.cli.mimic import parse_floats

    assert parse_floats("0.3, 0.1,0.3", "--strengths") == (0.1, 0.3)
    with pytest.raises(
        CLIError, match=r"--strengths: Strengths must be in \(0, 1\]; got \[0.0, 1.5\]"
    ):
        parse_floats("0,1.5", "--strengths")
    with pytest.raises(CLIError, match="--strengths: give numbers separated by commas; got 'abc'"):
        parse_floats("abc", "--strengths")


def test_pipelines_that_cannot_run_an_fp16_sd_model_are_refused_before_any_training(
    tiny_model_dir,
):
    """fp16 with an upcast VAE: diffusers' SD 1.x/2.x pipelines need one dtype. The refusal
    comes when the scenarios are chosen, not after textual inversion or LoRA has trained."""
    from mimicshield.models import load_models

    half = load_models(str(tiny_model_dir), device="cpu", dtype="fp16", with_decoder=True)
    assert (half.vae_dtype, half.dtype) == (torch.float32, torch.float16)
    for scenario in ("img2img", "inpaint", "textual-inversion", "lora"):
        with pytest.raises(ValueError, match=f"^{scenario}: .*Use --dtype fp32"):
            M.Mimicry(half, M.MimicrySettings(scenarios=[scenario]))
    M.Mimicry(half, M.MimicrySettings(scenarios=["sdedit-onestep", "sdedit-ddim"]))  # our own
    # the Python functions refuse too, before their first training step
    steps = []
    schedule = M.TrainingSchedule(steps=3)
    images = torch.rand(1, 3, 32, 32)
    for train in (M.textual_inversion_mimicry, M.lora_mimicry):
        with pytest.raises(ValueError, match="Use --dtype fp32"):
            train(half, images, schedule, callback=lambda s, t: steps.append(s))
    assert steps == []


def test_a_single_file_inpainting_model_loads_with_its_own_config(tiny_model_dir, tmp_path):
    """A 9-channel single file: --inpaint-model-config gives its architecture (the main
    model's --model-config does not reach it)."""
    from PIL import Image

    from mimicshield.testing import (
        copy_tiny_model,
        save_tiny_inpainting_model,
        save_tiny_single_file,
    )

    folder = save_tiny_inpainting_model(tmp_path / "inpaint")
    single = save_tiny_single_file(folder, tmp_path / "inpaint.safetensors")
    config = copy_tiny_model(folder, tmp_path / "inpaint-config", weights=False)
    Image.new("RGB", (32, 32), (200, 80, 30)).save(tmp_path / "a.png")
    args = ["mimic", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "-s", "inpaint"]
    args += ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32"]
    args += ["--resolution", "32", "--sample-steps", "2", "--inpaint-model", str(single)]
    args += ["--inpaint-model-config", str(config)]
    result = CliRunner().invoke(app, args, env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out" / "inpaint" / "a.png").size == (32, 32)


def test_fp16_training_scales_its_loss_and_skips_a_step_that_overflows():
    """Textual inversion and LoRA on an fp16 UNet: a gradient that underflows to 0 in fp16
    survives with the loss scaled, comes back at its fp32 value, and an overflow skips the step."""
    weight = torch.ones(4, requires_grad=True)

    def loss_of(factor: float) -> torch.Tensor:
        half = weight.half() * torch.tensor(1e-5, dtype=torch.float16)  # an fp16 layer
        return (half.float() * factor).sum()

    assert M._scaled_backward(loss_of(1e-4), [weight], 1.0)
    assert torch.all(weight.grad == 0)  # 1e-4 * 1e-5 underflows in fp16
    weight.grad = None
    assert M._scaled_backward(loss_of(1e-4), [weight], 2.0**12)
    torch.testing.assert_close(weight.grad, torch.full((4,), 1e-9), rtol=2e-2, atol=0)
    weight.grad = None
    assert not M._scaled_backward(loss_of(1e12), [weight], 2.0**12)  # inf in fp16
    assert weight.grad is None
