"""Every way a model reaches the protection maths: folders, hub ids, single files, and the configs.

All offline, on tiny random models saved the way users' checkpoints are: a diffusers folder, and
the same weights re-saved in the original CompVis/LDM single-file layout.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line

from mimicshield.models import (
    ModelLoadError,
    UnsupportedModelError,
    load_models,
    resolve_device,
    resolve_dtype,
    vae_dtype_for,
)
from mimicshield.testing import copy_tiny_model, save_tiny_single_file

CPU = {"device": "cpu", "dtype": "fp32", "local_files_only": True}

# a real SD 1.5 model_index also lists these; the loader must never load them
SD15_EXTRAS = {
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": True,
}


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The tiny model loaded from its folder: what every other path must reproduce exactly."""
    return load_models(str(tiny_model_dir), **CPU)


@pytest.fixture(scope="module")
def config_dir(tiny_model_dir, tmp_path_factory):
    """A ``--model-config`` folder: configs and tokenizer only, no weights, SD-1.5-like index."""
    folder = tmp_path_factory.mktemp("tiny-config") / "config"
    return copy_tiny_model(tiny_model_dir, folder, weights=False, model_index=SD15_EXTRAS)


@pytest.fixture(scope="module")
def single_files(tiny_model_dir, tmp_path_factory):
    """The tiny weights as one original-layout checkpoint, in both formats."""
    folder = tmp_path_factory.mktemp("tiny-single")
    return {
        suffix: save_tiny_single_file(tiny_model_dir, folder / f"tiny{suffix}")
        for suffix in (".safetensors", ".ckpt")
    }


def _assert_same_model(loaded, reference) -> None:
    """Same weights, same schedule: E(x), c and eps_theta(z_t, t, c) agree bit for bit."""
    for name in ("vae", "unet", "text_encoder"):
        got, want = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[key], want[key]) for key in want), name
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = reference.encode(x)
    assert torch.equal(loaded.encode(x), z)
    cond = reference.embed_prompt("a painting")
    assert torch.equal(loaded.embed_prompt("a painting"), cond)
    t = torch.tensor([500])
    assert torch.equal(loaded.predict_noise(z, t, cond), reference.predict_noise(z, t, cond))
    assert torch.equal(loaded.alphas_cumprod, reference.alphas_cumprod)
    assert loaded.scaling_factor == reference.scaling_factor
    assert loaded.prediction_type == "epsilon"


def test_unaligned_weights_get_memory_of_their_own():
    """Weights at an odd offset of a checkpoint's buffer are copied; aligned ones are kept."""
    from mimicshield.models import CPU_ALIGNMENT, realign_tensors

    layer = torch.nn.Linear(7, 5)
    buffer = torch.randn(40)
    offset = next(i for i in range(1, 16) if (buffer.data_ptr() + 4 * i) % CPU_ALIGNMENT)
    unaligned = buffer[offset : offset + 35].view(5, 7)
    layer.weight.data = unaligned
    kept = layer.bias.data_ptr()
    assert layer.bias.data_ptr() % CPU_ALIGNMENT == 0  # PyTorch allocates aligned
    assert realign_tensors(layer) == 1
    assert layer.weight.data_ptr() % CPU_ALIGNMENT == 0
    assert torch.equal(layer.weight, unaligned)
    assert layer.bias.data_ptr() == kept


def _assert_frozen(model) -> None:
    for module in (model.vae, model.unet, model.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


# ------------------------------------------------------------------ diffusers folder


def test_folder_loads_frozen_encoder_only(reference):
    _assert_frozen(reference)
    assert reference.vae.decoder is None and reference.vae.post_quant_conv is None
    assert reference.latent_shape(32, 32) == (4, 4, 4)


def test_with_decoder_keeps_the_decoder(tiny_model_dir, reference):
    model = load_models(str(tiny_model_dir), with_decoder=True, **CPU)
    _assert_frozen(model)
    z = torch.zeros(1, 4, 4, 4)
    assert model.vae.decode(z).sample.shape == (1, 3, 32, 32)
    assert torch.equal(
        model.encode(torch.zeros(1, 3, 32, 32)), reference.encode(torch.zeros(1, 3, 32, 32))
    )


def test_folder_never_loads_safety_checker_or_feature_extractor(tiny_model_dir, tmp_path):
    folder = copy_tiny_model(tiny_model_dir, tmp_path / "sd", model_index=SD15_EXTRAS)
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "config.json").write_text("not json: loading it would fail")
    model = load_models(str(folder), **CPU)
    assert not hasattr(model, "safety_checker") and not hasattr(model, "feature_extractor")


# ------------------------------------------------------------------ single files


def test_single_file_is_in_the_original_layout(single_files):
    from diffusers.loaders.single_file_utils import (
        infer_diffusers_model_type,
        load_single_file_checkpoint,
    )

    for path in single_files.values():
        checkpoint = load_single_file_checkpoint(str(path))
        prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
        assert all(key.startswith(prefixes) for key in checkpoint)
        assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in checkpoint
        assert "first_stage_model.decoder.up.3.upsample.conv.weight" in checkpoint
        assert infer_diffusers_model_type(checkpoint) == "v1"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_offline_with_config_matches_folder(
    suffix, single_files, config_dir, reference
):
    model = load_models(str(single_files[suffix]), single_file_config=str(config_dir), **CPU)
    _assert_same_model(model, reference)
    _assert_frozen(model)
    assert model.vae.decoder is None


def test_single_file_without_config_offline_is_one_clear_line(single_files, tmp_path, monkeypatch):
    """The built-in SD 1.x configs need a CLIP tokenizer, and none is here: the line names the
    files and both ways to provide them (tests/test_offline_configs.py loads with one)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("mimicshield.configs.BPE_PACKAGES", ())  # whether open_clip is installed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local_files_only=None follows the environment
    with pytest.raises(ModelLoadError) as error:
        load_models(str(single_files[".safetensors"]), device="cpu", dtype="fp32")
    assert_one_line(error, "--model-config FOLDER", "offline", "vocab.json and merges.txt")
    assert_one_line(error, "FOLDER/tokenizer/", "run once online")
    with pytest.raises(ModelLoadError) as error:  # a hub id as config, not cached: same answer
        load_models(str(single_files[".ckpt"]), single_file_config="org/sd-config", **CPU)
    assert_one_line(error, "--model-config", "org/sd-config")


def test_single_file_without_config_offline_uses_a_cached_config(
    single_files, config_dir, reference, tmp_path, monkeypatch
):
    """Once diffusers has cached the config it infers from the keys, offline loading works."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    repo_id = DIFFUSERS_DEFAULT_PIPELINE_PATHS["v1"]["pretrained_model_name_or_path"]
    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    copy_tiny_model(config_dir, repo / "snapshots" / commit, weights=False)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    model = load_models(str(single_files[".safetensors"]), **CPU)
    _assert_same_model(model, reference)

    # the cached config decides the prediction type (SD 2.x's says v-prediction)
    snapshot = repo / "snapshots" / commit
    copy_tiny_model(snapshot, snapshot, scheduler={"prediction_type": "v_prediction"})
    model = load_models(str(single_files[".safetensors"]), **CPU)
    assert model.prediction_type == "v_prediction"


def test_single_file_config_folder_must_exist(single_files):
    with pytest.raises(ModelLoadError) as error:
        load_models(str(single_files[".ckpt"]), single_file_config="./no-such-config", **CPU)
    assert_one_line(error, "no-such-config")


def test_single_file_weights_come_only_from_the_file(single_files, config_dir, tmp_path):
    """Missing text-encoder weights are an error, never silently filled from elsewhere."""
    from safetensors.torch import load_file, save_file

    state_dict = load_file(single_files[".safetensors"])
    partial = {k: v for k, v in state_dict.items() if not k.startswith("cond_stage_model.")}
    save_file(partial, tmp_path / "no-text.safetensors")
    with pytest.raises(ModelLoadError) as error:
        load_models(
            str(tmp_path / "no-text.safetensors"), single_file_config=str(config_dir), **CPU
        )
    assert_one_line(error, "--model-config")


def test_corrupt_single_file_is_one_clear_line(config_dir, tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError) as error:
        load_models(str(path), single_file_config=str(config_dir), **CPU)
    assert_one_line(error, "broken.safetensors")


def test_single_file_prediction_type_comes_from_the_config(single_files, config_dir, tmp_path):
    """The file has no scheduler: an explicit config decides the prediction type."""
    v_config = copy_tiny_model(
        config_dir, tmp_path / "v", weights=False, scheduler={"prediction_type": "v_prediction"}
    )
    model = load_models(str(single_files[".safetensors"]), single_file_config=str(v_config), **CPU)
    assert model.prediction_type == "v_prediction"
    x_config = copy_tiny_model(
        config_dir, tmp_path / "x0", weights=False, scheduler={"prediction_type": "sample"}
    )
    with pytest.raises(UnsupportedModelError) as error:
        load_models(str(single_files[".safetensors"]), single_file_config=str(x_config), **CPU)
    assert_one_line(error, "sample")


# ------------------------------------------------------------------ the checkpoint's own configs


@pytest.fixture(scope="module")
def custom_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny weights with a non-SD VAE scale, no VAE upcast and a 500-step schedule."""
    return copy_tiny_model(
        tiny_model_dir,
        tmp_path_factory.mktemp("tiny-custom") / "sd",
        vae={"scaling_factor": 0.5, "force_upcast": False},
        scheduler={"num_train_timesteps": 500, "timestep_spacing": "trailing"},
    )


def test_vae_scaling_factor_follows_the_config(custom_model_dir, reference):
    model = load_models(str(custom_model_dir), **CPU)
    assert model.scaling_factor == 0.5
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean = model.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(model.encode(x), 0.5 * mean)
    torch.testing.assert_close(model.encode(x), reference.encode(x) * (0.5 / 0.18215))


def test_schedule_follows_num_train_timesteps(custom_model_dir, reference):
    from diffusers import DDPMScheduler

    model = load_models(str(custom_model_dir), **CPU)
    assert model.num_train_timesteps == 500 and reference.num_train_timesteps == 1000
    config = json.loads((custom_model_dir / "scheduler" / "scheduler_config.json").read_text())
    torch.testing.assert_close(
        model.alphas_cumprod, DDPMScheduler.from_config(config).alphas_cumprod
    )


def test_inference_steps_land_where_the_checkpoints_scheduler_puts_them(custom_model_dir):
    """SDEdit and the pipelines place their DDIM steps by the config's timestep_spacing and
    steps_offset ("trailing", offset 1 here, on 500 training steps), as diffusers' own
    scheduler built from that config does, not by SD 1.x's "leading"."""
    from diffusers import DDIMScheduler

    from mimicshield.mimicry import ddim_scheduler, model_timesteps

    model = load_models(str(custom_model_dir), **CPU)
    assert (model.timestep_spacing, model.steps_offset) == ("trailing", 1)
    config = json.loads((custom_model_dir / "scheduler" / "scheduler_config.json").read_text())
    own = DDIMScheduler.from_config(config)
    own.set_timesteps(50)
    assert model_timesteps(model, 1.0, 50) == [int(t) for t in own.timesteps]
    assert model_timesteps(model, 1.0, 50)[0] == 499  # trailing starts at the last step
    assert model_timesteps(model, 0.1, 50) == [int(t) for t in own.timesteps[-5:]]
    ours = ddim_scheduler(model)
    ours.set_timesteps(50)
    assert ours.timesteps.tolist() == own.timesteps.tolist()
    torch.testing.assert_close(ours.alphas_cumprod, own.alphas_cumprod)


@pytest.mark.parametrize(
    ("component", "config", "needle"),
    [
        ("scheduler", {"_class_name": "EDMEulerScheduler"}, "EDMEulerScheduler"),
        ("scheduler", {"_class_name": "FlowMatchEulerDiscreteScheduler"}, "FlowMatch"),
        ("vae", {"shift_factor": 0.1159}, "shift_factor"),
        ("vae", {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, "latents_mean"),
    ],
)
def test_noise_processes_and_latent_spaces_the_maths_does_not_cover_are_refused(
    component, config, needle, tiny_model_dir, tmp_path
):
    """Without a model_index.json naming the pipeline, the scheduler's class and the VAE's
    latent normalisation are what tell an EDM, flow-matching or shifted-latent model apart;
    read as SD, its default betas or unshifted latents would be silently wrong."""
    folder = copy_tiny_model(tiny_model_dir, tmp_path / "sd", **{component: config})
    (folder / "model_index.json").unlink(missing_ok=True)
    with pytest.raises(UnsupportedModelError) as error:
        load_models(str(folder), **CPU)
    assert_one_line(error, needle)


@pytest.mark.parametrize("prediction_type", ["sample", "x0"])
def test_unknown_prediction_types_are_refused(prediction_type, tiny_model_dir, tmp_path):
    folder = copy_tiny_model(
        tiny_model_dir, tmp_path / "sd", scheduler={"prediction_type": prediction_type}
    )
    with pytest.raises(UnsupportedModelError) as error:
        load_models(str(folder), **CPU)
    assert_one_line(error, prediction_type, "epsilon")


@pytest.mark.parametrize(
    ("dtype", "which", "vae_dtype", "model_dtype"),
    [
        ("fp16", "tiny", torch.float32, torch.float16),  # SD's VAE config says force_upcast
        ("fp16", "custom", torch.float16, torch.float16),  # force_upcast=False
        ("bf16", "tiny", torch.bfloat16, torch.bfloat16),  # bf16 never overflows: no upcast
        ("fp32", "tiny", torch.float32, torch.float32),
    ],
)
def test_vae_dtype_follows_force_upcast(
    dtype, which, vae_dtype, model_dtype, tiny_model_dir, custom_model_dir
):
    folder = tiny_model_dir if which == "tiny" else custom_model_dir
    model = load_models(str(folder), device="cpu", dtype=dtype, local_files_only=True)
    assert model.dtype == model_dtype and model.vae_dtype == vae_dtype
    assert {p.dtype for p in model.vae.parameters()} == {vae_dtype}
    assert {p.dtype for p in model.unet.parameters()} == {model_dtype}
    assert {p.dtype for p in model.text_encoder.parameters()} == {model_dtype}


def test_vae_dtype_for():
    assert vae_dtype_for(torch.float16, force_upcast=True) == torch.float32
    assert vae_dtype_for(torch.float16, force_upcast=False) == torch.float16
    assert vae_dtype_for(torch.bfloat16, force_upcast=True) == torch.bfloat16


# ------------------------------------------------------------------ device and dtype


def _fake_hardware(monkeypatch, *, cuda: bool, bf16: bool = False, mps: bool = False) -> list:
    """Fake the hardware; returns the devices whose compute capability was asked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    # native support only (Ampere, compute capability 8, or newer): a T4 (7.5), which merely
    # emulates bf16, must get fp16; and the capability asked is the chosen device's own
    asked = []

    def capability(device=None):
        asked.append(device)
        return (8, 0) if bf16 else (7, 5)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **_: True)  # emulation counts
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return asked


@pytest.mark.parametrize(
    ("cuda", "bf16", "mps", "device", "dtype"),
    [
        (True, True, True, "cuda", torch.bfloat16),
        (True, False, False, "cuda", torch.float16),
        (False, False, True, "mps", torch.float16),
        (False, False, False, "cpu", torch.float32),
        (False, True, False, "cpu", torch.bfloat16),  # a CPU with AMX
    ],
)
def test_auto_device_and_dtype(cuda, bf16, mps, device, dtype, monkeypatch):
    _fake_hardware(monkeypatch, cuda=cuda, bf16=bf16, mps=mps)
    monkeypatch.setattr("mimicshield.models._cpu_has_amx", lambda: bf16)
    chosen = resolve_device("auto")
    assert chosen.type == device
    assert resolve_dtype("auto", chosen) == dtype


def test_bf16_is_asked_of_the_chosen_gpu_not_the_current_one(monkeypatch):
    asked = _fake_hardware(monkeypatch, cuda=True, bf16=True)
    assert resolve_dtype("auto", torch.device("cuda:1")) == torch.bfloat16
    assert asked == [torch.device("cuda:1")]


def test_device_and_dtype_can_be_overridden(monkeypatch):
    _fake_hardware(monkeypatch, cuda=True, bf16=True, mps=True)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("mps").type == "mps"
    assert resolve_dtype("fp32", torch.device("cuda")) == torch.float32
    assert resolve_dtype("FP16", torch.device("cpu")) == torch.float16
    assert resolve_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16


def test_unavailable_or_unknown_device_is_a_value_error(monkeypatch):
    _fake_hardware(monkeypatch, cuda=False, mps=False)
    for device in ("cuda", "cuda:1", "mps", "tpu"):
        with pytest.raises(ValueError, match=repr(device)):
            resolve_device(device)


def test_unknown_dtype_names_the_allowed_values():
    with pytest.raises(ValueError) as error:
        resolve_dtype("fp8", torch.device("cpu"))
    assert_one_line(error, "'fp8'", "auto", "fp32", "fp16", "bf16")
    with pytest.raises(ValueError):
        load_models("unused", device="cpu", dtype="half-ish")


# ------------------------------------------------------------------ sources that are not there


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_hub_id_offline_says_how_to_pass_a_local_path(monkeypatch):
    with pytest.raises(ModelLoadError) as error:
        load_models("nobody-here/no-such-model", **CPU)
    assert_one_line(error, "nobody-here/no-such-model", "offline", "--model PATH")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as error:
        load_models("nobody-here/no-such-model", device="cpu", dtype="fp32")
    assert_one_line(error, "--model PATH")


@pytest.mark.parametrize(
    "source", ["./no/such/folder", "no-such-model.safetensors", "/tmp/x/no.ckpt", "a/b/c"]
)
def test_missing_path_is_a_clear_error(source):
    with pytest.raises(ModelLoadError) as error:
        load_models(source, **CPU)
    assert_one_line(error, source, "no such")


def test_paths_that_are_not_models(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError) as error:
        load_models(str(tmp_path / "weights.bin"), **CPU)
    assert_one_line(error, ".safetensors/.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError) as error:
        load_models(str(tmp_path / "empty"), **CPU)
    assert_one_line(error, "not a Stable Diffusion diffusers folder", "unet")


def test_a_loaded_model_prints_in_one_short_line(tiny_model):
    text = repr(tiny_model)
    assert len(text) < 600 and "\n" not in text, text
    assert "scaling_factor=" in text and "family='sd1'" in text
