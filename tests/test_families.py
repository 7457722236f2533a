"""SD 2.x (base and 768-v), SDXL, family detection, ensembles, and the models that are refused.

Every family is a tiny random model with the real config shapes, saved as diffusers saves it and
as an original-layout single file, and loaded through the real loader. The references are
diffusers' own: ``get_velocity`` for v-prediction, and what ``StableDiffusionXLPipeline`` itself
hands its UNet for SDXL's conditioning.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from conftest import assert_one_line
from diffusers import DDPMScheduler
from safetensors.torch import save_file
from typer.testing import CliRunner

from mimicshield.ensemble import Ensemble, weighted_direction
from mimicshield.families import (
    FAMILIES,
    checkpoint_family,
    checkpoint_schedule,
    default_work_size,
    folder_family,
)
from mimicshield.methods import StepInputs, sds_minus, semantic_loss
from mimicshield.models import (
    ZERO_SNR_FLOOR,
    Conditioning,
    ModelLoadError,
    UnsupportedModelError,
    load_models,
)
from mimicshield.protector import Protector
from mimicshield.testing import copy_tiny_model, save_tiny_single_file

CPU = {"device": "cpu", "dtype": "fp32", "local_files_only": True}
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def family_dirs(tiny_family_dirs):
    return tiny_family_dirs


@pytest.fixture(scope="module")
def sd2v(family_dirs):
    return load_models(str(family_dirs["sd2-v"]), **CPU)


@pytest.fixture(scope="module")
def sdxl(family_dirs):
    return load_models(str(family_dirs["sdxl"]), **CPU)


def _frozen(model) -> bool:
    modules = [model.vae, model.unet, model.text_encoder, model.text_encoder_2]
    return all(
        not m.training and not any(p.requires_grad for p in m.parameters())
        for m in modules
        if m is not None
    )


# ------------------------------------------------------------------ loading each family


def test_sd2_v_folder_loads_as_v_prediction(sd2v):
    assert (sd2v.family, sd2v.prediction_type) == ("sd2-v", "v_prediction")
    assert sd2v.text_encoder_2 is None and _frozen(sd2v)
    cond = sd2v.condition(PROMPT, 2, 32, 32)
    assert cond.pooled is None and cond.time_ids is None
    assert cond.hidden_states.shape == (2, 77, 32)


def test_sdxl_folder_loads_two_text_encoders_and_its_vae_scale(sdxl):
    assert (sdxl.family, sdxl.prediction_type) == ("sdxl", "epsilon")
    assert sdxl.scaling_factor == 0.13025 and _frozen(sdxl)
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    cond = sdxl.condition(PROMPT, 2, 48, 32)
    assert cond.hidden_states.shape == (2, 77, 32 + 48)
    assert cond.pooled.shape == (2, 48)
    assert cond.time_ids.tolist() == [[48, 32, 0, 0, 48, 32]] * 2
    light = dataclasses.replace(sdxl, _prompt_cache={})  # --low-memory: encoders released
    light.embed_prompt(PROMPT)
    light.release_text_encoder()
    assert light.text_encoder is None and light.text_encoder_2 is None
    torch.testing.assert_close(light.condition(PROMPT, 2, 48, 32).pooled, cond.pooled)
    with pytest.raises(ValueError, match="condition"):  # a bare tensor lacks pooled + time ids
        sdxl.predict_noise(torch.zeros(2, 4, 6, 4), torch.tensor([1, 2]), cond.hidden_states)


def test_sd2_base_is_told_apart_by_its_scheduler_and_family_overrides_it(family_dirs, tmp_path):
    base = copy_tiny_model(
        family_dirs["sd2-v"], tmp_path / "base", scheduler={"prediction_type": "epsilon"}
    )
    model = load_models(str(base), **CPU)
    assert (model.family, model.prediction_type) == ("sd2-base", "epsilon")
    forced = load_models(str(base), family="sd2-v", **CPU)  # e.g. a fine-tune's wrong config
    assert (forced.family, forced.prediction_type) == ("sd2-v", "v_prediction")


def test_family_cannot_turn_sdxl_into_sd(family_dirs):
    with pytest.raises(ModelLoadError) as error:
        load_models(str(family_dirs["sdxl"]), family="sd1", **CPU)
    assert_one_line(error, "--family sd1", "SDXL")
    with pytest.raises(ValueError, match="sd2-base"):
        load_models(str(family_dirs["sdxl"]), family="sd3", **CPU)


def test_sdxl_single_file_matches_its_folder(family_dirs, sdxl, tmp_path):
    path = save_tiny_single_file(family_dirs["sdxl"], tmp_path / "xl.safetensors")
    config = copy_tiny_model(family_dirs["sdxl"], tmp_path / "config", weights=False)
    model = load_models(str(path), single_file_config=str(config), **CPU)
    assert (model.family, model.scaling_factor) == ("sdxl", 0.13025)
    for name in ("vae", "unet", "text_encoder", "text_encoder_2"):
        got, want = getattr(model, name).state_dict(), getattr(sdxl, name).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[key], want[key]) for key in want), name
    z, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([7])
    cond = model.condition(PROMPT, 1, 32, 32)
    assert torch.equal(model.predict_noise(z, t, cond), sdxl.predict_noise(z, t, cond))


def _cache_configs(cache, repo_id: str, folder) -> None:
    """Put ``folder``'s configs in a hub cache as ``repo_id``, as a past download would."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    copy_tiny_model(folder, repo / "snapshots" / ("0" * 40), weights=False)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)


def test_sd2_single_file_is_768_v_unless_told_base(family_dirs, tmp_path, monkeypatch):
    """Offline, without --model-config: the family's reference configs come from the cache."""
    path = save_tiny_single_file(family_dirs["sd2-v"], tmp_path / "sd2.ckpt")
    cache = tmp_path / "hub"
    _cache_configs(cache, FAMILIES["sd2-v"].config_repo, family_dirs["sd2-v"])
    base = copy_tiny_model(
        family_dirs["sd2-v"],
        tmp_path / "b",
        weights=False,
        scheduler={"prediction_type": "epsilon"},
    )
    _cache_configs(cache, FAMILIES["sd2-base"].config_repo, base)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))

    with pytest.warns(UserWarning, match="--family sd2-base"):
        model = load_models(str(path), **CPU)
    assert (model.family, model.prediction_type) == ("sd2-v", "v_prediction")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_models(str(path), family="sd2-base", **CPU)
    assert not [w for w in caught if "768-v" in str(w.message)]  # told: no guess to warn of
    assert (model.family, model.prediction_type) == ("sd2-base", "epsilon")


def _with_markers(path, *names: str):
    """Add ComfyUI-style marker keys (empty tensors) to a saved single file, in place."""
    from safetensors.torch import load_file

    state = load_file(path)
    state.update({name: torch.zeros(0) for name in names})
    save_file(state, path)
    return path


def test_sdxl_single_file_declaring_v_pred_and_ztsnr_loads_as_zero_snr_v(family_dirs, tmp_path):
    """diffusers reads any SDXL file as epsilon; the file's own v_pred/ztsnr keys say otherwise."""
    path = _with_markers(
        save_tiny_single_file(family_dirs["sdxl"], tmp_path / "vpred.safetensors"),
        "v_pred",
        "ztsnr",
    )
    config = copy_tiny_model(family_dirs["sdxl"], tmp_path / "config", weights=False)
    with pytest.warns(UserWarning, match="v_prediction"):
        model = load_models(str(path), single_file_config=str(config), **CPU)
    assert (model.prediction_type, model.timestep_spacing) == ("v_prediction", "trailing")
    # the zero-SNR schedule's abar_T = 0, floored where x̂0 divides by it
    reference = DDPMScheduler.from_config(
        DDPMScheduler.load_config(str(config), subfolder="scheduler"), rescale_betas_zero_snr=True
    ).alphas_cumprod
    assert reference[-1] == 0
    assert model.alphas_cumprod[-1] == ZERO_SNR_FLOOR
    torch.testing.assert_close(model.alphas_cumprod[:-1], reference[:-1])


def test_sd2_single_file_declaring_v_pred_needs_no_guess(family_dirs, tmp_path):
    path = _with_markers(
        save_tiny_single_file(family_dirs["sd2-v"], tmp_path / "v.safetensors"), "v_pred"
    )
    base = copy_tiny_model(
        family_dirs["sd2-v"],
        tmp_path / "b",
        weights=False,
        scheduler={"prediction_type": "epsilon"},
    )
    with pytest.warns(UserWarning, match="declares prediction_type='v_prediction'"):
        model = load_models(str(path), single_file_config=str(base), **CPU)
    assert (model.family, model.prediction_type) == ("sd2-v", "v_prediction")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn of: --family is the user's word
        model = load_models(str(path), single_file_config=str(base), family="sd2-base", **CPU)
    assert model.prediction_type == "epsilon"


@pytest.mark.parametrize(
    ("markers", "settings"),
    [
        ((), {}),
        (("v_pred",), {"prediction_type": "v_prediction"}),
        (
            ("v_pred", "ztsnr"),
            {
                "prediction_type": "v_prediction",
                "rescale_betas_zero_snr": True,
                "timestep_spacing": "trailing",
            },
        ),
    ],
)
def test_checkpoint_schedule_reads_the_marker_keys(markers, settings):
    assert checkpoint_schedule(["model.diffusion_model.x", *markers], "m.safetensors") == settings


@pytest.mark.parametrize("markers", [("edm_mean", "edm_std"), ("edm_vpred.sigma_max",)])
def test_edm_single_files_are_refused(markers):
    with pytest.raises(UnsupportedModelError) as error:
        checkpoint_schedule(["model.diffusion_model.x", *markers], "pg.safetensors")
    assert_one_line(error, "pg.safetensors", "EDM")


# ------------------------------------------------------------------ detection from files


SD = {"_class_name": "StableDiffusionPipeline"}
XL = {"_class_name": "StableDiffusionXLPipeline"}


@pytest.mark.parametrize(
    ("index", "unet", "prediction_type", "family"),
    [
        (SD, {"cross_attention_dim": 768}, "epsilon", "sd1"),
        (SD, {"cross_attention_dim": 1024}, "epsilon", "sd2-base"),
        ({}, {"cross_attention_dim": 1024}, "v_prediction", "sd2-v"),
        ({}, {"cross_attention_dim": 768}, "v_prediction", "sd1"),  # an SD 1.5 v fine-tune
        ({}, {"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, "epsilon", "sdxl"),
        (XL, {"cross_attention_dim": 80}, "epsilon", "sdxl"),
        (SD, {"cross_attention_dim": 32, "use_linear_projection": True}, "epsilon", "sd2-base"),
    ],
)
def test_folder_family(index, unet, prediction_type, family):
    assert folder_family(index, unet, prediction_type) == family


@pytest.mark.parametrize(
    ("key", "family"),
    [
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1"),
        ("cond_stage_model.model.ln_final.weight", "sd2-v"),
        ("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
    ],
)
def test_checkpoint_family_from_the_text_encoder_prefix(key, family):
    unet_key = "model.diffusion_model.input_blocks.0.0.weight"
    assert checkpoint_family([unet_key, key], "x.safetensors") == family


@pytest.mark.parametrize(
    "family_key", ["cond_stage_model.transformer.x", "conditioner.embedders.1.model.x"]
)
def test_an_lcm_single_file_is_refused_for_its_guidance_embedding(family_key):
    keys = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.time_embed.cond_proj.weight",
        family_key,
    ]
    with pytest.raises(UnsupportedModelError, match="x.safetensors: an LCM-distilled UNet"):
        checkpoint_family(keys, "x.safetensors")
    # a text encoder's own projection keys are not the UNet's
    assert checkpoint_family([keys[0], "cond_stage_model.cond_proj.weight"], "x") == "sd1"


def test_default_work_size_rises_to_the_native_size():
    assert default_work_size(512, [512, None]) == 512
    assert default_work_size(512, [512, 1024, 768]) == 1024
    assert default_work_size(None, [1024]) is None  # full resolution stays full resolution


# ------------------------------------------------------------------ refused models


@pytest.mark.parametrize(
    ("index", "subfolder", "needles"),
    [
        ({"_class_name": "FluxPipeline"}, "transformer", ("FLUX", "not yet supported")),
        ({"_class_name": "StableDiffusion3Pipeline"}, "transformer", ("SD3", "not yet supported")),
        ({"_class_name": "PixArtSigmaPipeline"}, "transformer", ("PixArt", "not yet supported")),
        ({"_class_name": "MyPipeline", "transformer": ["x", "Y"]}, "transformer", ("DiT",)),
        (
            {"unet": ["d", "U"], "scheduler": ["d", "FlowMatchEulerDiscreteScheduler"]},
            "unet",
            ("flow-matching", "FLUX"),
        ),
        (
            {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]},
            "unet",
            ("SDXL refiner",),
        ),
    ],
)
def test_transformer_and_flow_matching_folders_are_refused(index, subfolder, needles, tmp_path):
    (tmp_path / subfolder).mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError) as error:
        load_models(str(tmp_path), **CPU)
    assert_one_line(error, *needles)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias", "SD3"),
        ("double_blocks.0.img_attn.norm.key_norm.scale", "FLUX"),
        ("conditioner.embedders.0.model.ln_final.weight", "SDXL refiner"),
    ],
)
def test_transformer_single_files_are_refused(key, name, tmp_path):
    path = tmp_path / "model.safetensors"
    state = {key: torch.zeros(1)}
    if "refiner" in name:
        state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(UnsupportedModelError) as error:
        load_models(str(path), **CPU)
    assert_one_line(error, name)


# ------------------------------------------------------------------ v-prediction


class OracleVelocityUNet(torch.nn.Module):
    """A UNet that knows the noise n: it returns the true v = sqrt(abar) n - sqrt(1 - abar) z.

    z is recovered from z_t and n, and v comes from diffusers' ``get_velocity``, independently of
    the package's conversion.
    """

    def __init__(self, scheduler: DDPMScheduler, noise: torch.Tensor) -> None:
        super().__init__()
        self.scheduler, self.noise = scheduler, noise

    def forward(self, z_t, t, encoder_hidden_states=None, added_cond_kwargs=None):
        abar = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        z = (z_t - (1 - abar).sqrt() * self.noise) / abar.sqrt()
        return dataclasses.make_dataclass("Out", ["sample"])(
            self.scheduler.get_velocity(z, self.noise, t)
        )


def test_v_prediction_gives_back_the_noise(sd2v, family_dirs):
    scheduler = DDPMScheduler.from_pretrained(family_dirs["sd2-v"], subfolder="scheduler")
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    noise = torch.randn(2, 4, 4, 4, generator=generator)
    t = torch.tensor([3, 940])
    oracle = dataclasses.replace(sd2v, unet=OracleVelocityUNet(scheduler, noise))
    cond = sd2v.condition(PROMPT, 2, 32, 32)

    z = oracle.encode(x)
    eps_hat = oracle.predict_noise(scheduler.add_noise(z, noise, t), t, cond)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-4)
    # L_S and the SDS residual both see this epsilon: a perfect model gives no direction at all
    assert semantic_loss(eps_hat, noise).max() < 1e-8
    inputs = StepInputs(t=t, noise=noise, cond=cond)
    assert sds_minus(oracle, x, inputs).abs().max() < 1e-3 * sds_minus(sd2v, x, inputs).abs().max()


def test_fine_tuning_a_v_model_trains_it_on_v(sd2v, family_dirs):
    """Textual inversion and LoRA use the model's own training target: v for SD 2.x-v."""
    from mimicshield.mimicry import _denoising_loss

    scheduler = DDPMScheduler.from_pretrained(family_dirs["sd2-v"], subfolder="scheduler")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    shape = (2, *sd2v.latent_shape(32, 32))
    replay = torch.Generator().manual_seed(5)  # the loss's own draws: posterior, t, then n
    torch.randn(shape, generator=replay)
    torch.randint(0, sd2v.num_train_timesteps, (2,), generator=replay)
    noise = torch.randn(shape, generator=replay)
    oracle = dataclasses.replace(sd2v, unet=OracleVelocityUNet(scheduler, noise))
    cond = sd2v.embed_prompt(PROMPT).expand(2, -1, -1)

    def loss(model) -> float:
        return _denoising_loss(model, images, cond, torch.Generator().manual_seed(5)).item()

    assert loss(oracle) < 1e-8  # a perfect v model has nothing to learn
    wrong_target = loss(dataclasses.replace(oracle, prediction_type="epsilon"))
    assert wrong_target > 1e-4 and wrong_target > 1e4 * loss(oracle)


# ------------------------------------------------------------------ SDXL conditioning


class UNetCalled(Exception):
    """Raised by a spy UNet once it has recorded its inputs: nothing after it matters."""


def _spy(seen: dict):
    """A UNet ``forward`` that records its keyword inputs into ``seen``."""

    def forward(sample, timestep, **kwargs):
        seen.update(kwargs, sample=sample)
        raise UNetCalled

    return forward


def test_sdxl_conditioning_is_what_the_diffusers_pipeline_passes(family_dirs, sdxl, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(family_dirs["sdxl"])  # not our loader
    theirs: dict = {}
    pipe.unet.forward = _spy(theirs)
    with pytest.raises(UNetCalled):  # guidance 1: no CFG batch, the prompt's conditioning only
        pipe(PROMPT, height=48, width=32, num_inference_steps=1, guidance_scale=1.0)

    cond = sdxl.condition(PROMPT, 1, 48, 32)
    ours: dict = {}
    monkeypatch.setattr(sdxl.unet, "forward", _spy(ours))
    with pytest.raises(UNetCalled):
        sdxl.predict_noise(torch.zeros(1, 4, 6, 4), torch.tensor([10]), cond)

    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
    for name in ("text_embeds", "time_ids"):
        torch.testing.assert_close(
            ours["added_cond_kwargs"][name], theirs["added_cond_kwargs"][name]
        )


# ------------------------------------------------------------------ ensembles


def test_ensemble_direction_is_the_weighted_sum(tiny_model, sdxl):
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1

    def draws(model):
        shape = (1, *model.latent_shape(32, 32))
        return StepInputs(
            t=torch.randint(0, 1000, (1,), generator=generator),
            noise=torch.randn(shape, generator=generator),
            cond=model.condition(PROMPT, 1, 32, 32),
            posterior_noise=torch.randn(shape, generator=generator),
        )

    inputs = [draws(tiny_model), draws(sdxl)]
    ensemble = Ensemble([tiny_model, sdxl], weights=[1, 3])
    assert ensemble.weights == [0.25, 0.75]
    terms = [(m, w, i) for (m, w), i in zip(ensemble, inputs, strict=True)]
    got = weighted_direction(sds_minus, terms, x)
    want = 0.25 * sds_minus(tiny_model, x, inputs[0]) + 0.75 * sds_minus(sdxl, x, inputs[1])
    torch.testing.assert_close(got, want)
    assert got.grad_fn is None  # finished gradients: no model's graph outlives its term


def test_protector_gives_each_model_its_own_draws_and_conditioning(tiny_model, sdxl, monkeypatch):
    import mimicshield.protector as protector_module

    calls = []

    def recording(direction, terms, x):
        calls.append((list(terms), x.clone()))
        return weighted_direction(direction, terms, x)

    monkeypatch.setattr(protector_module, "weighted_direction", recording)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    config = {"steps": 1, "eps": 8 / 255, "step_size": 2 / 255}
    Protector(Ensemble([tiny_model, sdxl], [1, 3]), "sds-", **config).protect(images)

    [(terms, x)] = calls
    (m1, w1, in1), (m2, w2, in2) = terms
    assert (m1, w1, m2, w2) == (tiny_model, 0.25, sdxl, 0.75)
    assert isinstance(in2.cond, Conditioning) and in2.cond.pooled is not None
    assert in1.cond.pooled is None
    assert not torch.equal(in1.noise, in2.noise)  # separate draws, not one shared n
    want = 0.25 * sds_minus(tiny_model, x, in1) + 0.75 * sds_minus(sdxl, x, in2)
    torch.testing.assert_close(weighted_direction(sds_minus, terms, x), want)

    # a one-model ensemble is exactly the model: same draws, same bytes
    single = Protector(tiny_model, "sds-", **config).protect(images).images
    wrapped = Protector(Ensemble([tiny_model]), "sds-", **config).protect(images).images
    assert torch.equal(single, wrapped)


def test_ensemble_rejects_bad_weights(tiny_model):
    for weights in ([1, 2], [0], [-1], [float("nan")]):
        with pytest.raises(ValueError, match="weight"):
            Ensemble([tiny_model], weights)


def test_cli_loads_each_model_with_its_own_options(tiny_model, sdxl, tmp_path, monkeypatch):
    from PIL import Image

    from mimicshield.cli.main import app

    calls = []

    def fake_load(source, **kwargs):
        calls.append((source, kwargs["family"], kwargs["single_file_config"]))
        # a copy of the holder: protect releases the text encoders of the model it gets
        return dataclasses.replace(sdxl if source == "xl" else tiny_model, _prompt_cache={})

    monkeypatch.setattr("mimicshield.models.load_models", fake_load)
    Image.new("RGB", (32, 32), (120, 60, 30)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    base = ["protect", str(tmp_path / "a.png"), "-o", str(out), "--steps", "1"]
    base += ["--method", "encoder", "--work-size", "native", "--device", "cpu"]
    base += ["--model", "sd", "--model", "xl"]
    options = ["--family", "auto", "--family", "sdxl", "--model-config", "cfg"]
    options += ["--model-config", "auto", "--model-weight", "1", "--model-weight", "3"]
    result = CliRunner().invoke(app, [*base, *options])
    assert result.exit_code == 0, result.output
    assert calls == [("sd", None, "cfg"), ("xl", "sdxl", None)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == ["sd", "xl"] and manifest["model_weights"] == [0.25, 0.75]
    assert manifest["family"] == ["sd1", "sdxl"]

    bad = CliRunner().invoke(app, [*base, "--model-weight", "1"])
    assert bad.exit_code != 0 and "one weight per --model" in str(bad.exception or bad.output)


def _lpips_weights_file(path):
    """LPIPS weights of the right layout (random values), as evaluate checks them."""
    from safetensors.torch import save_file

    from mimicshield.metrics import LPIPS

    save_file({k: v.contiguous() for k, v in LPIPS().state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("command", ["mimic", "evaluate", "purify", "ui"])
def test_every_command_that_loads_one_model_takes_family(tmp_path, monkeypatch, command):
    """A single SD 2.x file is guessed 768-v; `--family sd2-base` must reach the loader from
    every command, not only from `protect` (and `auto` means: detect it)."""
    from PIL import Image

    from mimicshield.cli.main import app

    calls = []

    class Stop(Exception):
        pass

    def fake_load(source, **kwargs):
        calls.append(kwargs["family"])
        raise Stop

    monkeypatch.setattr("mimicshield.models.load_models", fake_load)
    monkeypatch.setattr(
        "mimicshield.webapp.launch", lambda service, **_: calls.append(service.defaults.family[0])
    )
    Image.new("RGB", (32, 32), (120, 60, 30)).save(tmp_path / "a.png")
    (tmp_path / "p").mkdir()
    # evaluate pairs the folders and checks the LPIPS weights before the model loads
    Image.new("RGB", (32, 32), (121, 60, 30)).save(tmp_path / "p" / "a.png")
    lpips = _lpips_weights_file(tmp_path / "lpips.safetensors")
    arguments = {
        "mimic": ["mimic", str(tmp_path / "a.png"), "-o", str(tmp_path / "o")],
        "evaluate": ["evaluate", str(tmp_path), str(tmp_path / "p"), "-o", str(tmp_path / "o")]
        + ["--lpips-weights", str(lpips)],
        "purify": ["purify", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "-m", "vae"],
        "ui": ["ui"],
    }[command]
    checkpoint = tmp_path / "sd2.ckpt"  # ui checks that a model path exists before it starts
    checkpoint.write_bytes(b"weights")
    for family in ["sd2-base", "auto"]:
        options = ["--model", str(checkpoint), "--family", family, "--device", "cpu"]
        CliRunner().invoke(app, [*arguments, *options])
    assert calls == ["sd2-base", None]


# ------------------------------------------------------------------ the steps, from the formulas


def _direction_by_hand(model, scheduler, method, x, t, noise, posterior, cond):
    """sds- or advdm+ written from the raw diffusers modules, not the package's adapter:
    E(x) = s (mean + std n_post), z_t = sqrt(abar) z + sqrt(1 - abar) n, the UNet with SDXL's
    added conditioning, and a v output turned into eps = sqrt(abar) v + sqrt(1 - abar) z_t."""
    x = x.clone().requires_grad_(True)
    dist = model.vae.encode(x).latent_dist
    z = model.vae.config.scaling_factor * (dist.mean + dist.std * posterior)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    added = None
    if cond.pooled is not None:
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}

    def eps_hat(latent):
        z_t = abar.sqrt() * latent + (1 - abar).sqrt() * noise
        out = model.unet(
            z_t, t, encoder_hidden_states=cond.hidden_states, added_cond_kwargs=added
        ).sample
        if scheduler.config.prediction_type == "v_prediction":
            out = abar.sqrt() * out + (1 - abar).sqrt() * z_t
        return out

    if method == "sds-":
        with torch.no_grad():
            residual = eps_hat(z) - noise
        return -torch.autograd.grad((z * residual).sum(), x)[0]
    per_image = ((eps_hat(z) - noise) ** 2).flatten(1).mean(1)  # advdm+: ascend L_S
    return torch.autograd.grad(per_image.sum(), x)[0]


@pytest.mark.parametrize("family", ["sd2-v", "sdxl"])
@pytest.mark.parametrize("method", ["sds-", "advdm+"])
def test_steps_of_other_families_match_their_formulas(family, method, family_dirs, sd2v, sdxl):
    from mimicshield.methods import METHODS

    model = {"sd2-v": sd2v, "sdxl": sdxl}[family]
    scheduler = DDPMScheduler.from_pretrained(family_dirs[family], subfolder="scheduler")
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    noise, posterior = torch.randn(2, 2, 4, 4, 4, generator=generator)
    t = torch.tensor([40, 900])
    cond = model.condition(PROMPT, 2, 32, 32)
    inputs = StepInputs(t=t, noise=noise, cond=cond, posterior_noise=posterior)
    got = METHODS[method].direction(model, x, inputs)
    want = _direction_by_hand(model, scheduler, method, x, t, noise, posterior, cond)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
