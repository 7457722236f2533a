"""Mimicry (and SDEdit purification) on SD 2.x-v and SDXL tiny random models.

SDEdit conditions the UNet through ``model.condition`` at the image's pixel size, so SDXL gets
its pooled embedding and the time ids of an uncropped image of that size. img2img, inpainting,
LoRA and textual inversion run diffusers' SDXL pipelines, which must condition the UNet the same
way; textual inversion learns its token in both text encoders. Plumbing only: the models are
random.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import WEIGHTS, requires_assets

from mimicshield import mimicry as M
from mimicshield.methods import eps_from_v_prediction
from mimicshield.models import ZERO_SNR_FLOOR, load_models
from mimicshield.purify import sdedit_purify
from mimicshield.testing import copy_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = {"device": "cpu", "dtype": "fp32", "local_files_only": True, "with_decoder": True}
HEIGHT, WIDTH = 48, 32  # not square, so the time ids show which side is which


@pytest.fixture(scope="module")
def folders(tiny_family_dirs):
    return tiny_family_dirs


@pytest.fixture(scope="module")
def models(folders):
    return {name: load_models(str(folder), **CPU) for name, folder in folders.items()}


@pytest.fixture
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    return torch.rand(2, 3, HEIGHT, WIDTH, generator=generator)


def _spy_unet(model, monkeypatch) -> list[dict]:
    """Record what the UNet is called with, and still run it."""
    calls: list[dict] = []
    forward = model.unet.forward

    def spy(sample, timestep, **kwargs):
        calls.append({"sample": sample, "timestep": timestep, **kwargs})
        return forward(sample, timestep, **kwargs)

    monkeypatch.setattr(model.unet, "forward", spy)
    return calls


@pytest.mark.parametrize("family", ["sd2-v", "sdxl"])
def test_sdedit_runs_and_is_seeded(models, family, images):
    model = models[family]
    steps = []
    out = M.sdedit(model, images, 0.02, seed=3, callback=lambda s, t: steps.append((s, t)))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert steps == [(1, 2), (2, 2)]
    torch.testing.assert_close(M.sdedit(model, images, 0.02, seed=3), out, rtol=0, atol=0)
    torch.testing.assert_close(M.sdedit(model, images[1:], 0.02, seed=3), out[1:])
    one_step = M.sdedit(model, images, 0.02, multistep=False, seed=3)
    assert one_step.shape == images.shape and not torch.equal(one_step, out)
    assert not torch.equal(M.sdedit(model, images, 0.02, multistep=False, seed=4), one_step)


def test_sdedit_at_strength_1_on_a_zero_snr_v_model_starts_at_pure_noise(folders, images, tmp_path):
    """abar_T = 0 would make x̂0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar) divide by zero."""
    zero_snr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    folder = copy_tiny_model(folders["sd2-v"], tmp_path / "zsnr", scheduler=zero_snr)
    model = load_models(str(folder), **CPU)
    assert M.model_timesteps(model, 1.0, 10)[0] == model.num_train_timesteps - 1
    out = M.sdedit(model, images, 1.0, num_steps=10)
    assert torch.isfinite(out).all() and out.std() > 0


def test_x0_at_the_floored_terminal_step_is_the_v_models_own():
    """At abar = 2^-24, x̂0 through epsilon equals sqrt(abar) z_t - sqrt(1 - abar) v."""
    generator = torch.Generator().manual_seed(0)
    z_t, v = torch.randn(2, 1, 4, 8, 8, generator=generator)
    abar = torch.tensor([ZERO_SNR_FLOOR])
    eps = eps_from_v_prediction(v, z_t, torch.tensor([0]), abar)
    expected = abar.sqrt() * z_t - (1 - abar).sqrt() * v
    torch.testing.assert_close(M.predict_x0(z_t, eps, abar), expected, rtol=0, atol=2e-3)
    # and abar = 0 itself is what the floor is for
    assert not torch.isfinite(
        M.predict_x0(z_t, eps_from_v_prediction(v, z_t, 0, 0 * abar), 0.0)
    ).all()


def test_sdxl_sdedit_gives_the_unet_its_pooled_embedding_and_the_image_size(
    models, images, monkeypatch
):
    model = models["sdxl"]
    calls = _spy_unet(model, monkeypatch)
    M.sdedit(model, images, 0.02, prompt="a photo")
    want = model.condition("a photo", 2, HEIGHT, WIDTH)
    assert [int(c["timestep"][0]) for c in calls] == [11, 1]
    for call in calls:
        added = call["added_cond_kwargs"]
        assert added["time_ids"].tolist() == [[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]] * 2
        torch.testing.assert_close(added["text_embeds"], want.pooled)
        torch.testing.assert_close(call["encoder_hidden_states"], want.hidden_states)
        assert call["sample"].shape == (2, 4, HEIGHT // 8, WIDTH // 8)


def test_sd2_v_sdedit_passes_no_added_conditioning(models, images, monkeypatch):
    calls = _spy_unet(models["sd2-v"], monkeypatch)
    M.sdedit(models["sd2-v"], images, 0.01, multistep=False)
    assert len(calls) == 1 and calls[0]["added_cond_kwargs"] is None


def test_mimicry_runs_every_paired_scenario_on_sdxl(models, images):
    model = models["sdxl"]
    settings = M.MimicrySettings(sdedit_strengths=(0.01,), sample_steps=2, img2img_strengths=(0.5,))
    mimicry = M.Mimicry(model, settings)
    for variant in (
        M.Variant("sdedit-onestep", 0.01),
        M.Variant("img2img", 0.5),
        M.Variant("inpaint"),
    ):
        steps: list[tuple[int, int]] = []
        out = mimicry.run(variant, images[0], callback=lambda s, t, seen=steps: seen.append((s, t)))
        assert out.shape == images[0].shape and out.min() >= 0 and out.max() <= 1
        total = mimicry.steps(variant)
        assert steps == [(i, total) for i in range(1, total + 1)], variant


def _img2img(model, images, seed, prompt="a photo"):
    return M.img2img(model, images, 0.5, prompt=prompt, num_inference_steps=4, seed=seed)


def _inpaint(model, images, seed, prompt="a photo"):
    return M.inpaint(model, images, prompt=prompt, num_inference_steps=2, seed=seed)


@pytest.mark.parametrize("run", [_img2img, _inpaint], ids=["img2img", "inpaint"])
def test_sdxl_pipelines_keep_the_size_and_are_seeded(models, images, run):
    model = models["sdxl"]
    out = run(model, images, seed=1)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(run(model, images, seed=1), out)  # the same bytes twice
    assert torch.equal(run(model, images[1:], seed=1), out[1:])  # one generator per image
    assert not torch.equal(run(model, images, seed=2), out)


@pytest.mark.parametrize("run", [_img2img, _inpaint], ids=["img2img", "inpaint"])
def test_sdxl_pipelines_condition_the_unet_as_model_condition_does(
    models, images, monkeypatch, run
):
    """Both text encoders, the pooled embedding and the time ids of the uncropped image, as
    SDEdit gets them; the first half of the guidance batch is the (zero) negative prompt."""
    model = models["sdxl"]
    calls = _spy_unet(model, monkeypatch)
    run(model, images[:1], seed=0, prompt="a cat")
    want = model.condition("a cat", 1, HEIGHT, WIDTH)
    assert len(calls) == 2  # 4 steps at strength 0.5, or 2 inpainting steps
    for call in calls:
        assert call["sample"].shape == (2, 4, HEIGHT // 8, WIDTH // 8)
        added = call["added_cond_kwargs"]
        assert added["time_ids"].tolist() == [[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]] * 2
        torch.testing.assert_close(added["text_embeds"][1:], want.pooled)
        torch.testing.assert_close(call["encoder_hidden_states"][1:], want.hidden_states)
        assert not call["encoder_hidden_states"][0].any()  # force_zeros_for_empty_prompt


def test_sdxl_inpainting_checkpoint_gets_the_mask_and_masked_image(
    folders, models, tmp_path, images, monkeypatch
):
    """A 9-channel SDXL inpainting UNet (as --inpaint-model) sees latents, mask, masked image."""
    import shutil

    from diffusers import UNet2DConditionModel

    from mimicshield.testing import TINY_SDXL_UNET

    folder = shutil.copytree(folders["sdxl"], tmp_path / "sdxl-inpaint")
    torch.manual_seed(0)
    UNet2DConditionModel(**{**TINY_SDXL_UNET, "in_channels": 9}).save_pretrained(folder / "unet")
    inpainter = load_models(str(folder), inpainting=True, **CPU)
    assert inpainter.is_xl and inpainter.unet.config.in_channels == 9
    calls = _spy_unet(inpainter, monkeypatch)
    mimicry = M.Mimicry(models["sdxl"], M.MimicrySettings(sample_steps=2), inpaint_model=inpainter)
    out = mimicry.run(M.Variant("inpaint"), images[0])
    assert out.shape == images[0].shape
    assert [c["sample"].shape for c in calls] == [(2, 9, HEIGHT // 8, WIDTH // 8)] * 2


def test_pipelines_match_the_family_and_its_prediction_type(models):
    from diffusers import StableDiffusionImg2ImgPipeline

    sdxl, sd2_v = models["sdxl"], models["sd2-v"]
    assert M.pipeline_class("img2img", sdxl).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert M.pipeline_class("inpaint", sdxl).__name__ == "StableDiffusionXLInpaintPipeline"
    assert M.pipeline_class("img2img", sd2_v) is StableDiffusionImg2ImgPipeline
    with pytest.raises(ValueError, match="does not fit an SDXL model"):
        M.build_pipeline(StableDiffusionImg2ImgPipeline, sdxl)
    pipe = M.build_pipeline(M.pipeline_class("img2img", sd2_v), sd2_v)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe = M.build_pipeline(M.pipeline_class("img2img", sdxl), sdxl)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.text_encoder_2 is sdxl.text_encoder_2 and pipe.tokenizer_2 is sdxl.tokenizer_2
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, sdxl.alphas_cumprod.cpu())


def test_sdxl_fp16_pipelines_upcast_their_own_copy_of_the_vae(folders, images):
    """fp16: the model keeps an fp32 VAE (force_upcast). The SDXL pipelines cast the VAE they
    are given to fp16 after encoding; done to the model's, its weights would be rounded for
    good (so runs would drift) and text-to-image would fail on an fp16/fp32 mismatch."""
    try:  # older torch builds have no fp16 convolution on the CPU
        torch.nn.functional.conv2d(torch.ones(1, 1, 2, 2).half(), torch.ones(1, 1, 1, 1).half())
    except RuntimeError:
        pytest.skip("this torch has no fp16 convolution on the CPU")
    model = load_models(str(folders["sdxl"]), **{**CPU, "dtype": "fp16"})
    assert model.dtype == torch.float16 and model.vae_dtype == torch.float32
    vae_before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    out = _img2img(model, images, seed=1)
    assert out.shape == images.shape and torch.isfinite(out).all()
    assert torch.equal(_img2img(model, images, seed=1), out)
    assert _inpaint(model, images[:1], seed=1).shape == images[:1].shape
    samples = M.generate(model, "a photo", 1, HEIGHT, WIDTH, num_inference_steps=2)
    assert samples.shape == (1, 3, HEIGHT, WIDTH) and torch.isfinite(samples).all()
    vae_after = model.vae.state_dict()
    assert all(v.dtype == torch.float32 for v in vae_after.values())
    assert all(torch.equal(vae_after[k], vae_before[k]) for k in vae_before)
    assert M.sdedit(model, images, 0.01).shape == images.shape  # still the model it was


def test_lora_mimicry_trains_and_samples_sdxl_at_the_image_size(models, images, monkeypatch):
    model = models["sdxl"]
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    calls = _spy_unet(model, monkeypatch)
    schedule = M.TrainingSchedule(steps=2, learning_rate=1e-2)
    samples, weights = M.lora_mimicry(
        model, images, schedule, rank=2, num_samples=1, num_inference_steps=2
    )
    assert samples.shape == (1, 3, HEIGHT, WIDTH)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # it learned
    assert len(calls) == 2 + 2  # two training steps, then two sampling steps
    for call in calls:
        time_ids = call["added_cond_kwargs"]["time_ids"]
        assert time_ids.tolist() == [[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]] * len(time_ids)
    after = model.unet.state_dict()
    assert after.keys() == unet_before.keys()
    assert all(torch.equal(after[k], unet_before[k]) for k in after)


TOKEN, PROMPT = "<mimicshield>", "an image in the style of <mimicshield>"  # the defaults


def _spy_generate(monkeypatch) -> list[dict]:
    """Record the modules textual inversion samples with, and still sample."""
    calls: list[dict] = []
    generate = M.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(M, "generate", spy)
    return calls


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(module, snapshot) -> bool:
    state = module.state_dict()
    return state.keys() == snapshot.keys() and all(
        torch.equal(state[k], snapshot[k]) for k in state
    )


def test_sdxl_textual_inversion_learns_one_row_in_each_text_encoder_and_nothing_else(
    models, images, monkeypatch
):
    model = models["sdxl"]
    own = {
        "clip_l": (model.text_encoder, model.tokenizer),
        "clip_g": (model.text_encoder_2, model.tokenizer_2),
    }
    before = {key: _snapshot(encoder) for key, (encoder, _) in own.items()}
    vocabulary = {key: len(tokenizer) for key, (_, tokenizer) in own.items()}
    unet_before = _snapshot(model.unet)
    sampled_with = _spy_generate(monkeypatch)
    schedule = M.TrainingSchedule(steps=2, learning_rate=1e-2)
    steps: list[int] = []

    samples, learned = M.textual_inversion_mimicry(
        model,
        images,
        schedule,
        num_samples=2,
        num_inference_steps=2,
        callback=lambda s, t: steps.append(s),
    )
    assert samples.shape == (2, 3, HEIGHT, WIDTH) and samples.min() >= 0 and samples.max() <= 1
    assert steps == [1, 2]
    assert set(learned) == {"clip_l", "clip_g"}
    assert learned["clip_l"].shape == (32,) and learned["clip_g"].shape == (48,)

    (used,) = sampled_with  # the pipeline samples with the trained copies, not the model's own
    trained = {
        "clip_l": (used["text_encoder"], used["tokenizer"]),
        "clip_g": (used["text_encoder_2"], used["tokenizer_2"]),
    }
    for key, (encoder, tokenizer) in trained.items():
        own_encoder, own_tokenizer = own[key]
        assert encoder is not own_encoder and tokenizer is not own_tokenizer
        token_id = tokenizer.convert_tokens_to_ids(TOKEN)
        assert token_id == vocabulary[key] and len(tokenizer) == vocabulary[key] + 1
        table = encoder.get_input_embeddings().weight
        own_table = own_encoder.get_input_embeddings().weight
        assert table.shape == (vocabulary[key] + 1, own_table.shape[1])
        assert torch.equal(table[:token_id], own_table), key  # every other row as it was
        assert torch.equal(table[token_id], learned[key]), key
        initial = own_table[own_tokenizer("art", add_special_tokens=False).input_ids].mean(0)
        assert (learned[key] - initial).abs().max() > 1e-3, key  # the new row learned

    for key, (encoder, tokenizer) in own.items():  # the model is left as it was
        assert _same(encoder, before[key]) and len(tokenizer) == vocabulary[key]
        assert TOKEN not in tokenizer.get_vocab()
    assert _same(model.unet, unet_before)

    again = M.textual_inversion_mimicry(
        model, images, schedule, num_samples=2, num_inference_steps=2
    )
    assert torch.equal(again[0], samples)  # the same bytes twice
    assert all(torch.equal(again[1][key], learned[key]) for key in learned)
    reseeded = dataclasses.replace(schedule, seed=1)
    other, _ = M.textual_inversion_mimicry(
        model, images, reseeded, num_samples=2, num_inference_steps=2
    )
    assert not torch.equal(other, samples)


def test_sdxl_textual_inversion_conditions_the_unet_as_model_condition_does_with_its_copies(
    models, images, monkeypatch
):
    """Learning rate 0 keeps the copies as they start, so every training step must see exactly
    what ``model.condition`` gives with the copies in place of the model's text encoders: both
    encoders' penultimate states (32 + 48 wide), the second's pooled embedding, and the time
    ids of an uncropped image of the training size. The samples are conditioned on it too."""
    model = models["sdxl"]
    sampled_with = _spy_generate(monkeypatch)
    calls = _spy_unet(model, monkeypatch)
    schedule = M.TrainingSchedule(steps=2, learning_rate=0.0)
    M.textual_inversion_mimicry(  # trained on the prompt it samples with, to compare the two
        model,
        images,
        schedule,
        training_templates=("an image in the style of {}",),
        num_samples=1,
        num_inference_steps=2,
    )

    (used,) = sampled_with
    for suffix in ("", "_2"):  # each new row starts at the mean of the initializer's rows
        tokenizer, encoder = used[f"tokenizer{suffix}"], used[f"text_encoder{suffix}"]
        own_table = getattr(model, f"text_encoder{suffix}").get_input_embeddings().weight
        initial = own_table[tokenizer("art", add_special_tokens=False).input_ids].mean(0)
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(TOKEN)]
        torch.testing.assert_close(row, initial)
    names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    copies = dataclasses.replace(model, **{n: used[n] for n in names}, _prompt_cache={})
    want = copies.condition(PROMPT, 1, HEIGHT, WIDTH)
    assert want.hidden_states.shape == (1, 77, 32 + 48) and want.pooled.shape == (1, 48)
    # the placeholder is one new token, so the model's own encoders condition differently
    assert not torch.allclose(model.condition(PROMPT, 1, HEIGHT, WIDTH).pooled, want.pooled)

    assert len(calls) == 2 + 2  # two training steps, then two sampling steps
    for call in calls[:2]:
        assert call["sample"].shape == (1, 4, HEIGHT // 8, WIDTH // 8)
        added = call["added_cond_kwargs"]
        assert added["time_ids"].tolist() == [[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]]
        torch.testing.assert_close(call["encoder_hidden_states"], want.hidden_states)
        torch.testing.assert_close(added["text_embeds"], want.pooled)
    for call in calls[2:]:  # guidance: the (zero) negative prompt, then the prompt
        assert call["sample"].shape == (2, 4, HEIGHT // 8, WIDTH // 8)
        added = call["added_cond_kwargs"]
        assert added["time_ids"].tolist() == [[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]] * 2
        torch.testing.assert_close(call["encoder_hidden_states"][1:], want.hidden_states)
        torch.testing.assert_close(added["text_embeds"][1:], want.pooled)
        assert not call["encoder_hidden_states"][0].any()


def test_mimicry_learns_textual_inversion_on_sdxl(models, images):
    settings = M.MimicrySettings(ti_steps=2, num_samples=1, sample_steps=2)
    mimicry = M.Mimicry(models["sdxl"], settings)
    variant = M.Variant("textual-inversion")
    steps: list[tuple[int, int]] = []
    samples, weights = mimicry.run_set(variant, images, lambda s, t: steps.append((s, t)))
    assert samples.shape == (1, 3, HEIGHT, WIDTH)
    assert {k: tuple(v.shape) for k, v in weights.items()} == {"clip_l": (32,), "clip_g": (48,)}
    total = mimicry.steps(variant)
    assert steps == [(i, total) for i in range(1, total + 1)]


def test_mimic_cli_runs_textual_inversion_on_an_sdxl_folder(folders, tmp_path):
    from PIL import Image
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from mimicshield.cli.main import app

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, colour in enumerate(((200, 80, 30), (20, 90, 210))):
        Image.new("RGB", (40, 32), colour).save(inputs / f"{i}.png")
    out = tmp_path / "out"
    args = ["mimic", str(inputs), "-o", str(out), "--model", str(folders["sdxl"])]
    args += ["--device", "cpu", "--dtype", "fp32", "-s", "ti", "--ti-steps", "2"]
    args += ["--num-samples", "1", "--sample-steps", "2", "--resolution", "32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    folder = out / "textual-inversion"
    assert Image.open(folder / "sample_000.png").size == (32, 32)
    weights = load_file(str(folder / "textual-inversion_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {"clip_l": (32,), "clip_g": (48,)}


def test_mimic_cli_runs_img2img_and_inpainting_on_an_sdxl_folder(folders, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from mimicshield.cli.main import app

    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("RGB", (40, 32), (200, 80, 30)).save(inputs / "a.png")
    out = tmp_path / "out"
    args = ["mimic", str(inputs), "-o", str(out), "--model", str(folders["sdxl"])]
    args += ["--device", "cpu", "--dtype", "fp32", "-s", "img2img,inpaint"]
    args += ["--img2img-strengths", "0.5", "--sample-steps", "2", "--resolution", "32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for variant in ("img2img@0.5", "inpaint"):
        assert Image.open(out / variant / "a.png").size == (32, 32)


@requires_assets
def test_evaluate_cli_runs_the_sdxl_pipelines_on_clean_and_protected_alike(folders, tmp_path):
    """The same seed on the same image gives the same img2img and inpainting output, so a
    "protection" that changes nothing is exactly as far from the clean mimicry as it is (0)."""
    from PIL import Image
    from typer.testing import CliRunner

    from mimicshield.cli.main import app

    generator = torch.Generator().manual_seed(1)
    for i in range(2):
        image = torch.rand(3, 32, 32, generator=generator)
        noisy = (image + (torch.rand(image.shape, generator=generator) - 0.5) * 16 / 255).clamp(
            0, 1
        )
        for source, picture in (("clean", image), ("noisy", noisy), ("copy", image)):
            (tmp_path / source).mkdir(exist_ok=True)
            array = (picture * 255).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(array).save(tmp_path / source / f"img{i}.png")
    out = tmp_path / "eval"
    args = ["evaluate", str(tmp_path / "clean"), str(tmp_path / "noisy"), str(tmp_path / "copy")]
    args += ["-o", str(out), "--model", str(folders["sdxl"]), "--device", "cpu", "--dtype", "fp32"]
    args += ["--lpips-weights", str(WEIGHTS / "lpips_alexnet.safetensors")]
    args += ["--resolution", "32", "--thumbnail-size", "32"]
    args += ["-s", "img2img,inpaint", "--img2img-strengths", "0.5", "--sample-steps", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    records = json.loads((out / "metrics.json").read_text())["records"]

    def values(source, scenario):
        return [
            r["value"]
            for r in records
            if (r["source"], r["scenario"], r["metric"])
            == (source, scenario, "lpips_vs_clean_mimicry")
        ]

    for scenario in ("img2img", "inpaint"):
        assert values("copy", scenario) == [0.0, 0.0]
        assert len(values("noisy", scenario)) == 2 and max(values("noisy", scenario)) > 0
    assert (out / "mimicry" / "noisy" / "img2img@0.5" / "img1.png").is_file()


def test_sdedit_purification_works_on_sdxl(models):
    odd = torch.rand(1, 3, 30, 21, generator=torch.Generator().manual_seed(6))
    out = sdedit_purify(odd, models["sdxl"], strength=0.01, seed=2)
    assert out.shape == odd.shape
    torch.testing.assert_close(sdedit_purify(odd, models["sdxl"], strength=0.01, seed=2), out)
