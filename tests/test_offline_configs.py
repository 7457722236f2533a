"""The built-in configs a single checkpoint file loads with when the hub cannot give its family's.

Two halves. The real-size configs are checked against facts: each family's networks, built from
them on the meta device (no memory), have the published parameter counts, and diffusers'
single-file converter maps an original-layout checkpoint of those shapes onto exactly their
weight names and shapes; the schedule, VAE scale and tokenizer settings are each family's.
The wiring is checked on tiny models: with the built-in folder pointed at tiny configs of the
same layout, an offline load with an empty hub cache succeeds wherever a CLIP tokenizer is
found (the hub cache, a ``--model-config`` tokenizer folder, an installed ``open_clip``) and
fails in one line, naming the files and the two ways to provide them, where none is.
"""

from __future__ import annotations

import gzip
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line, same_weights

from mimicshield import configs
from mimicshield.configs import (
    BPE_FILE,
    Vocabulary,
    builtin_families,
    builtin_folder,
    byte_symbols,
    vocabulary_from_bpe,
)
from mimicshield.families import FAMILIES, folder_family
from mimicshield.models import ModelLoadError, load_models
from mimicshield.testing import (
    copy_tiny_model,
    save_tiny_inpainting_model,
    save_tiny_single_file,
    save_tiny_stable_diffusion,
)

CPU = {"device": "cpu", "dtype": "fp32", "local_files_only": True}
COMMIT = "0" * 40
PROMPT = "a painting, by someone!"


@pytest.fixture(autouse=True)
def no_installed_bpe(monkeypatch):
    """Whether open_clip is installed here must not change a result: each test says."""
    monkeypatch.setattr(configs, "BPE_PACKAGES", ())


def _cache_files(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Put ``files`` (path in the repo -> file here) in a hub cache as ``repo_id`` had them."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name, source in files.items():
        target = repo / "snapshots" / COMMIT / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


def _tokenizer_files(tokenizer: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + name: tokenizer / name for name in ("vocab.json", "merges.txt")}


# ------------------------------------------------------------------ the real-size configs

# Published parameter counts: SD 1.5's UNet, SD 2.x's, SDXL's; the SD VAE (the same network
# in every family); CLIP ViT-L/14's text tower; OpenCLIP ViT-H/14's with the last of its 24
# layers dropped, as SD 2.x uses it; OpenCLIP ViT-bigG/14's with its projection (SDXL).
UNET_PARAMETERS = {
    "sd1": 859_520_964,
    "sd2-base": 865_910_724,
    "sd2-v": 865_910_724,
    "sdxl": 2_567_463_684,
}
VAE_PARAMETERS = 83_653_863
TEXT_PARAMETERS = {
    "sd1": (123_060_480,),
    "sd2-base": (340_387_840,),
    "sd2-v": (340_387_840,),
    "sdxl": (123_060_480, 694_659_840),
}
# what each family's reference model (and so a mimic's pipeline) runs with
SCHEDULES = {
    "sd1": ("epsilon", 512, 0.18215),
    "sd2-base": ("epsilon", 512, 0.18215),
    "sd2-v": ("v_prediction", 768, 0.18215),
    "sdxl": ("epsilon", 1024, 0.13025),
}
# OpenCLIP pads with token 0, "!" (SD 2.x and SDXL's second encoder); CLIP with its end token
PAD_TOKENS = {
    "sd1": ("<|endoftext|>",),
    "sd2-base": ("!",),
    "sd2-v": ("!",),
    "sdxl": ("<|endoftext|>", "!"),
}
# the model type diffusers' own single-file code reads from a file of each family
MODEL_TYPES = {"sd1": "v1", "sd2-base": "v2", "sd2-v": "v2", "sdxl": "xl_base"}


def test_every_family_has_built_in_configs():
    assert builtin_families() == tuple(sorted(FAMILIES))


def _config(family: str, name: str) -> dict:
    file = "scheduler_config.json" if name == "scheduler" else "config.json"
    return json.loads((builtin_folder(family) / name / file).read_text())


def _networks(family: str) -> dict[str, torch.nn.Module]:
    """The family's networks built from its built-in configs, on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = builtin_folder(family)
    with init_empty_weights():
        networks = {
            "unet": UNet2DConditionModel.from_config(_config(family, "unet")),
            "vae": AutoencoderKL.from_config(_config(family, "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        }
        if (folder / "text_encoder_2").is_dir():
            config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            networks["text_encoder_2"] = CLIPTextModelWithProjection(config)
    return networks


@pytest.fixture(scope="module")
def networks() -> dict[str, dict[str, torch.nn.Module]]:
    return {family: _networks(family) for family in FAMILIES}


def _count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_built_in_configs_build_networks_of_the_published_sizes(family, networks):
    built = networks[family]
    assert all(p.is_meta for module in built.values() for p in module.parameters())
    assert _count(built["unet"]) == UNET_PARAMETERS[family]
    assert _count(built["vae"]) == VAE_PARAMETERS
    texts = [built[name] for name in ("text_encoder", "text_encoder_2") if name in built]
    assert tuple(_count(text) for text in texts) == TEXT_PARAMETERS[family]


def _original_layout(family: str, built: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """A checkpoint of the family's original (CompVis/LDM/SGM) layout, of meta tensors.

    Written by the test helpers' inverse of the converter, with what real files hold beyond
    the networks diffusers builds: SD 2.x's OpenCLIP keeps its 24th layer, which SD 2.x skips.
    """
    from mimicshield.testing import (
        _clip_to_ldm,
        _open_clip_to_ldm,
        _unet_key_to_ldm,
        _vae_key_to_ldm,
    )

    unet_config, vae = _config(family, "unet"), built["vae"].state_dict()
    checkpoint = {
        "model.diffusion_model." + _unet_key_to_ldm(key, unet_config): value
        for key, value in built["unet"].state_dict().items()
    }
    for key, value in vae.items():
        ldm_key = _vae_key_to_ldm(key, len(_config(family, "vae")["block_out_channels"]))
        if ".mid.attn_1." in ldm_key and ldm_key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        checkpoint["first_stage_model." + ldm_key] = value
    text = built["text_encoder"].state_dict()
    if family == "sdxl":
        checkpoint.update(_clip_to_ldm(text, "conditioner.embedders.0.transformer."))
        second = built["text_encoder_2"].state_dict()
        checkpoint.update(_open_clip_to_ldm(second, "conditioner.embedders.1.model."))
    elif family.startswith("sd2"):
        openclip = _open_clip_to_ldm(text, "cond_stage_model.model.")
        prefix = "cond_stage_model.model.transformer.resblocks."
        for key, value in list(openclip.items()):
            if key.startswith(prefix + "22."):
                openclip[key.replace(prefix + "22.", prefix + "23.")] = value
        checkpoint.update(openclip)
    else:
        checkpoint.update(_clip_to_ldm(text, "cond_stage_model.transformer."))
    return checkpoint


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_single_file_converter_fills_exactly_the_built_in_networks(family, networks):
    """Every weight diffusers converts from a real-layout file of this family has a place of
    the same shape in the networks the built-in configs build, and every place is filled."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )

    built = networks[family]
    checkpoint = _original_layout(family, built)
    assert infer_diffusers_model_type(checkpoint) == MODEL_TYPES[family]
    for name, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        convert = SINGLE_FILE_LOADABLE_CLASSES[cls]["checkpoint_mapping_fn"]
        converted = convert(checkpoint=dict(checkpoint), config=_config(family, name))
        assert _shapes(converted) == _shapes(built[name].state_dict()), name

    texts = {"text_encoder": ("cond_stage_model.model.", "conditioner.embedders.0.transformer.")}
    texts["text_encoder_2"] = ("conditioner.embedders.1.model.", None)
    for name, (open_clip_prefix, clip_prefix) in texts.items():
        if name not in built:
            continue
        model = built[name]
        if family == "sdxl" and clip_prefix is not None:
            converted = convert_ldm_clip_checkpoint(checkpoint, clip_prefix)
        elif family.startswith("sd2") or name == "text_encoder_2":
            converted = convert_open_clip_checkpoint(model, checkpoint, prefix=open_clip_prefix)
        else:
            converted = convert_ldm_clip_checkpoint(checkpoint)
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattens CLIPTextModel
            converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
        want = {k: v for k, v in _shapes(model.state_dict()).items() if "position_ids" not in k}
        got = {k: v for k, v in _shapes(converted).items() if "position_ids" not in k}
        assert got == want, name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_built_in_schedule_vae_and_tokenizers_are_the_familys(family):
    prediction_type, pixels, scaling_factor = SCHEDULES[family]
    scheduler, vae, unet = (_config(family, name) for name in ("scheduler", "vae", "unet"))
    assert scheduler["prediction_type"] == prediction_type
    assert (scheduler["timestep_spacing"], scheduler["steps_offset"]) == ("leading", 1)
    assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"]) == (
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert scheduler["num_train_timesteps"] == 1000
    assert (vae["scaling_factor"], vae["force_upcast"]) == (scaling_factor, True)
    assert vae["sample_size"] == unet["sample_size"] * 8 == pixels
    folder = builtin_folder(family)
    pads = tuple(
        json.loads((folder / name / "tokenizer_config.json").read_text())["pad_token"]
        for name in ("tokenizer", "tokenizer_2")
        if (folder / name).is_dir()
    )
    assert pads == PAD_TOKENS[family]
    # and the loader's own detection reads each folder as its family
    index = json.loads((folder / "model_index.json").read_text())
    assert folder_family(index, unet, prediction_type) == family


@pytest.mark.parametrize(
    ("family", "encoder"),
    [
        ("sd1", "text_encoder"),
        ("sd2-v", "text_encoder"),
        ("sdxl", "text_encoder"),
        ("sdxl", "text_encoder_2"),
    ],
)
def test_built_in_text_encoders_pool_where_the_hub_configs_pool(family, encoder):
    """transformers pools a CLIP prompt by its special-token ids: the hub's SD configs carry
    CLIP's original ids (end token 2), which pool at the highest token id, where others pool
    at the first end token. Textual inversion's placeholder (an id above the end token) tells
    them apart, so SDXL's pooled embedding would differ between online and offline loads."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from mimicshield.testing import TINY_TEXT

    config = json.loads((builtin_folder(family) / encoder / "config.json").read_text())
    special = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    small = {key: value for key, value in TINY_TEXT.items() if key != "projection_dim"}
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=config["vocab_size"] + 1, **small, **special))
    start, end, placeholder = (
        config["vocab_size"] - 2,
        config["vocab_size"] - 1,
        config["vocab_size"],
    )
    ids = torch.tensor([[start, 320, placeholder, end, end, end]])
    with torch.no_grad():
        out = model(ids)
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, 2])  # the placeholder's


def test_sd2_768_v_upcasts_its_attention():
    """SD 2.1-v overflows in fp16 attention (its release computes it in fp32); 512-base not."""
    assert _config("sd2-v", "unet")["upcast_attention"] is True
    assert _config("sd2-base", "unet")["upcast_attention"] is False


def test_package_data_covers_every_built_in_file():
    """The wheel ships the configs: pyproject's package-data globs match every file."""
    tomllib = pytest.importorskip("tomllib")
    from fnmatch import fnmatch

    root = Path(configs.__file__).parent
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    package = root.parent
    files = [f for f in root.rglob("*") if f.is_file() and f.suffix == ".json"]
    assert files
    for file in files:
        relative = file.relative_to(package).as_posix()
        assert any(fnmatch(relative, glob) for glob in globs["mimicshield"]), relative


# ------------------------------------------------------------------ the CLIP vocabulary


def _bpe_file(folder: Path, merges: list[str]) -> Path:
    """A BPE merges file in the layout OpenAI's (and open_clip's) is: a header, then merges."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / BPE_FILE
    path.write_bytes(gzip.compress(("\n".join(["#version: test", *merges]) + "\n").encode()))
    return path


# merges that spell a few words of PROMPT (and one more than the tiny vocabularies take)
TINY_MERGES = ["a i", "p ai", "n t", "pai nt", "i n", "in g</w>", "paint ing</w>", "b y"]
TINY_BPE_SIZE = 2 * 256 + 7 + 2  # bytes, bytes ending a word, 7 of the merges, start and end


def test_byte_symbols_are_256_printable_characters():
    symbols = byte_symbols()
    assert len(set(symbols)) == 256
    assert symbols[0] == "!" and symbols[93] == "~" and symbols[-1] == chr(256 + 67)
    assert not any(symbol.isspace() for symbol in symbols)


def test_a_vocabulary_is_built_from_a_bpe_file(tmp_path):
    """The ids are those of the hub's CLIP vocab.json: bytes, bytes ending a word, merges in
    order, then the start and end tokens; the merges after the size are not taken."""
    from transformers import CLIPTokenizer

    path = _bpe_file(tmp_path, TINY_MERGES)
    vocabulary = vocabulary_from_bpe(path, TINY_BPE_SIZE, "test")
    assert vocabulary is not None and vocabulary.problem(TINY_BPE_SIZE) is None
    vocab = json.loads(vocabulary.vocab_json)
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["ai"] == 512
    assert vocab["a</w>"] == 320  # as in CLIP's own vocabulary
    assert vocab["painting</w>"] == 518 and "by" not in vocab
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (519, 520)
    vocabulary.write(tmp_path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    ids = tokenizer("A Painting").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>",
        "a</w>",
        "painting</w>",
        "<|endoftext|>",
    ]
    assert vocabulary_from_bpe(path, TINY_BPE_SIZE + 5, "test") is None  # too few merges
    broken = tmp_path / "broken" / BPE_FILE
    broken.parent.mkdir()
    broken.write_bytes(b"not gzip")
    assert vocabulary_from_bpe(broken, TINY_BPE_SIZE, "test") is None


def test_a_vocabulary_of_another_size_is_not_taken():
    vocab = json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2}).encode()
    vocabulary = Vocabulary(vocab, b"#version: 0.2\n", "test")
    assert vocabulary.problem(3) is None
    assert "has 3 tokens, and the text encoder takes 49408" in vocabulary.problem(49408)
    assert "lacks CLIP's" in Vocabulary(b"{}", b"", "test").problem(0)
    assert "not JSON" in Vocabulary(b"{", b"", "test").problem(0)


def test_the_installed_bpe_file_is_found_without_importing_its_package(tmp_path, monkeypatch):
    """open_clip imports torchvision and timm: its file is found by the package's location."""
    package = tmp_path / "site" / "fake_open_clip"
    _bpe_file(package, TINY_MERGES)
    (package / "__init__.py").write_text("raise ImportError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(configs, "BPE_PACKAGES", ("not_installed_anywhere", "fake_open_clip"))
    found = configs.packaged_vocabulary(TINY_BPE_SIZE)
    assert found is not None and "fake_open_clip" in found.origin
    assert "fake_open_clip" not in sys.modules
    assert configs.packaged_vocabulary(TINY_BPE_SIZE + 2) is None  # too few merges


def test_the_real_open_clip_vocabulary_tokenizes_as_clip_does(monkeypatch):
    """Where open_clip is installed: its BPE file gives the CLIP ids known from the hub's
    tokenizer (a photo of a cat: 320 1125 539 320 2368)."""
    from transformers import CLIPTokenizer

    monkeypatch.setattr(configs, "BPE_PACKAGES", ("open_clip", "clip"))
    vocabulary = configs.packaged_vocabulary(configs.text_vocab_size("sd1"))
    if vocabulary is None:
        pytest.skip("open_clip (or OpenAI's clip) is not installed")
    with configs.assembled_configs("sd1", vocabulary) as folder:
        tokenizer = CLIPTokenizer.from_pretrained(Path(folder) / "tokenizer")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# ------------------------------------------------------------------ loading offline, tiny


@pytest.fixture(scope="module")
def tiny_dirs(tiny_model_dir, tiny_family_dirs, tmp_path_factory) -> dict[str, Path]:
    """Tiny models of every family, saved as diffusers saves them."""
    base = copy_tiny_model(
        tiny_family_dirs["sd2-v"],
        tmp_path_factory.mktemp("sd2-base") / "sd2-base",
        scheduler={"prediction_type": "epsilon"},
    )
    return {"sd1": tiny_model_dir, "sd2-base": base, **tiny_family_dirs}


@pytest.fixture(scope="module")
def tiny_builtin(tiny_dirs, tmp_path_factory) -> Path:
    """Built-in configs of the tiny models: their architecture, the real tokenizer settings
    (pad tokens), and no vocabulary, which must be found elsewhere as for the real ones."""
    root = tmp_path_factory.mktemp("builtin")
    for family, folder in tiny_dirs.items():
        target = copy_tiny_model(folder, root / family, weights=False)
        for tokenizer in target.glob("tokenizer*"):
            for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
                (tokenizer / name).unlink(missing_ok=True)
            real = builtin_folder(family) / tokenizer.name / "tokenizer_config.json"
            (tokenizer / "tokenizer_config.json").write_bytes(real.read_bytes())
    return root


@pytest.fixture
def builtin(tiny_builtin, monkeypatch) -> Path:
    monkeypatch.setattr(configs, "CONFIGS", tiny_builtin)
    return tiny_builtin


def _assert_loads_as_its_folder(model, folder: Path, family: str) -> None:
    reference = load_models(str(folder), **CPU)
    assert (model.family, model.prediction_type) == (reference.family, reference.prediction_type)
    assert model.family == family
    assert model.scaling_factor == reference.scaling_factor
    assert (model.timestep_spacing, model.steps_offset) == ("leading", 1)
    for name in ("vae", "unet", "text_encoder", "text_encoder_2"):
        if getattr(reference, name) is not None:
            assert same_weights(getattr(model, name), getattr(reference, name)), name
    tokenizers = [model.tokenizer, model.tokenizer_2] if model.is_xl else [model.tokenizer]
    assert tuple(t.pad_token for t in tokenizers) == PAD_TOKENS[family]
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    cond = model.condition(PROMPT, 1, 32, 32)
    assert torch.isfinite(model.predict_noise(z, t, cond)).all()


@pytest.mark.parametrize(
    ("repo", "subfolder"),
    [
        ("openai/clip-vit-large-patch14", ""),  # a CLIP model's repo, tokenizer at the root
        ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2/"),  # another family's
    ],
)
def test_offline_with_an_empty_cache_an_sd1_file_loads_through_the_built_in_configs(
    repo, subfolder, builtin, tiny_dirs, hub_cache, tmp_path, monkeypatch
):
    """HF_HUB_OFFLINE, no SD 1.5 configs cached: the built-in ones, and a CLIP tokenizer that
    another download left in the cache; the same model as its diffusers folder, silently."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = save_tiny_single_file(tiny_dirs["sd1"], tmp_path / "sd1.safetensors")
    _cache_files(hub_cache, repo, _tokenizer_files(tiny_dirs["sd1"] / "tokenizer", subfolder))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_models(str(path), device="cpu", dtype="fp32")
    _assert_loads_as_its_folder(model, tiny_dirs["sd1"], "sd1")
    assert torch.equal(
        model.embed_prompt(PROMPT), load_models(str(tiny_dirs["sd1"]), **CPU).embed_prompt(PROMPT)
    )


@pytest.mark.parametrize("family", ["sd2-v", "sd2-base", "sdxl"])
def test_offline_sd2_and_sdxl_files_load_through_the_built_in_configs(
    family, builtin, tiny_dirs, hub_cache, tmp_path
):
    """Their OpenCLIP tokenizers share CLIP's vocabulary; the built-in settings pad with "!"."""
    path = save_tiny_single_file(tiny_dirs[family], tmp_path / f"{family}.safetensors")
    clip = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
    _cache_files(hub_cache, clip, _tokenizer_files(tiny_dirs[family] / "tokenizer"))
    chosen = None if family == "sd2-v" else family  # an SD 2.x file is read as 768-v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 768-v guess, said elsewhere
        model = load_models(str(path), family=chosen, **CPU)
    _assert_loads_as_its_folder(model, tiny_dirs[family], family)


def test_an_inpainting_file_loads_through_the_built_in_configs(builtin, hub_cache, tmp_path):
    """Its family's configs with the UNet's 9 inputs (latents, mask, masked-image latents)."""
    folder = save_tiny_inpainting_model(tmp_path / "inpaint")
    path = save_tiny_single_file(folder, tmp_path / "inpaint.safetensors")
    _cache_files(hub_cache, "openai/clip-vit-large-patch14", _tokenizer_files(folder / "tokenizer"))
    model = load_models(str(path), inpainting=True, **CPU)
    assert (model.family, model.unet.config.in_channels) == ("sd1", 9)
    reference = load_models(str(folder), inpainting=True, **CPU)
    assert same_weights(model.unet, reference.unet)


def test_a_model_config_folder_holding_only_a_tokenizer_completes_the_built_in_configs(
    builtin, tiny_dirs, hub_cache, tmp_path
):
    """What the missing-tokenizer message asks for: FOLDER/tokenizer/ with the two files."""
    path = save_tiny_single_file(tiny_dirs["sdxl"], tmp_path / "xl.safetensors")
    folder = tmp_path / "just-the-tokenizer"
    for name, source in _tokenizer_files(tiny_dirs["sdxl"] / "tokenizer", "tokenizer/").items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(source.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_models(str(path), single_file_config=str(folder), **CPU)
    _assert_loads_as_its_folder(model, tiny_dirs["sdxl"], "sdxl")

    (folder / "tokenizer" / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0}))
    with pytest.raises(ModelLoadError) as error:
        load_models(str(path), single_file_config=str(folder), **CPU)
    assert_one_line(error, f"--model-config {folder}", "not the CLIP tokenizer of SDXL")


def test_open_clip_gives_the_vocabulary_where_nothing_is_cached(
    tiny_builtin, hub_cache, tmp_path, monkeypatch
):
    """A tiny model whose text encoder takes the vocabulary a (tiny) BPE file builds."""
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModel

    from mimicshield.testing import TINY_TEXT

    builtin = tmp_path / "builtin"
    shutil.copytree(tiny_builtin, builtin)
    monkeypatch.setattr(configs, "CONFIGS", builtin)
    folder = save_tiny_stable_diffusion(tmp_path / "sd")
    special = {"bos_token_id": TINY_BPE_SIZE - 2, "eos_token_id": TINY_BPE_SIZE - 1}
    config = CLIPTextConfig(vocab_size=TINY_BPE_SIZE, pad_token_id=1, **special, **TINY_TEXT)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    copy_tiny_model(folder / "text_encoder", builtin / "sd1" / "text_encoder", weights=False)
    path = save_tiny_single_file(folder, tmp_path / "sd.safetensors")
    with pytest.raises(ModelLoadError, match="open_clip"):  # not installed, nothing cached
        load_models(str(path), **CPU)

    _bpe_file(tmp_path / "site" / "open_clip", TINY_MERGES)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(configs, "BPE_PACKAGES", ("open_clip",))
    model = load_models(str(path), **CPU)
    assert same_weights(model.text_encoder, CLIPTextModel.from_pretrained(folder / "text_encoder"))
    tokens = model.tokenizer("a painting", padding="max_length", max_length=77).input_ids
    assert tokens[:4] == [TINY_BPE_SIZE - 2, 320, 518, TINY_BPE_SIZE - 1]


def _proxy_error() -> Exception:
    """What huggingface_hub 2.x lets through when a proxy refuses the connection."""
    httpx2 = pytest.importorskip("httpx2")
    return httpx2.ProxyError("407 Proxy Authentication Required")


@pytest.mark.parametrize(
    "failure",
    [
        lambda: OSError("We couldn't connect to 'https://huggingface.co' to load the files"),
        _proxy_error,  # no OSError: it used to skip the fallback and end in a traceback
    ],
    ids=["connection", "proxy"],
)
def test_online_a_hub_that_fails_falls_back_to_the_built_in_configs(
    failure, builtin, tiny_dirs, hub_cache, tmp_path, monkeypatch
):
    """The hub id stays what a user with a network gets; only when it fails, and said."""
    from mimicshield import models

    asked = []

    def unreachable(repo_id: str, local_files_only: bool) -> str:
        asked.append((repo_id, local_files_only))
        raise failure()

    monkeypatch.setattr(models, "_config_snapshot", unreachable)
    path = save_tiny_single_file(tiny_dirs["sd1"], tmp_path / "sd1.safetensors")
    tokenizer = _tokenizer_files(tiny_dirs["sd1"] / "tokenizer", "tokenizer/")
    _cache_files(hub_cache, "runwayml/stable-diffusion-v1-5", tokenizer)
    said = r"built-in SD 1.x configs, with the CLIP tokenizer from the hub cache \(runwayml/"
    with pytest.warns(UserWarning, match=said):
        model = load_models(str(path), device="cpu", dtype="fp32", local_files_only=False)
    assert asked[0] == (FAMILIES["sd1"].config_repo, False)
    _assert_loads_as_its_folder(model, tiny_dirs["sd1"], "sd1")


# ------------------------------------------------------------------ no tokenizer anywhere


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_offline_without_any_tokenizer_is_one_line_naming_the_files_and_the_ways(
    family, tiny_dirs, hub_cache, tmp_path
):
    """The real built-in configs: the tokenizer is looked for before anything is converted."""
    path = save_tiny_single_file(tiny_dirs[family], tmp_path / "m.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelLoadError) as error:
            load_models(str(path), **CPU)
    repo = FAMILIES[family].config_repo
    assert_one_line(error, "m.safetensors: offline", "vocab.json and merges.txt", repr(repo))
    assert_one_line(error, "FOLDER/tokenizer/", "--model-config FOLDER", "run once online")


def test_a_tokenizer_of_another_size_in_the_cache_is_passed_over(tiny_dirs, hub_cache, tmp_path):
    """A cached tiny tokenizer is not the 49,408-token CLIP one the real configs need."""
    _cache_files(
        hub_cache, "openai/clip-vit-large-patch14", _tokenizer_files(tiny_dirs["sd1"] / "tokenizer")
    )
    path = save_tiny_single_file(tiny_dirs["sd1"], tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError) as error:
        load_models(str(path), **CPU)
    assert_one_line(error, "no CLIP tokenizer")


def test_a_file_the_built_in_configs_do_not_fit_says_where_they_came_from(
    tiny_builtin, tiny_dirs, hub_cache, tmp_path, monkeypatch
):
    import shutil

    builtin = tmp_path / "builtin"
    shutil.copytree(tiny_builtin, builtin)
    copy_tiny_model(builtin / "sd1", builtin / "sd1", unet={"cross_attention_dim": 64})
    monkeypatch.setattr(configs, "CONFIGS", builtin)
    _cache_files(
        hub_cache, "openai/clip-vit-large-patch14", _tokenizer_files(tiny_dirs["sd1"] / "tokenizer")
    )
    path = save_tiny_single_file(tiny_dirs["sd1"], tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError) as error:
        load_models(str(path), **CPU)
    assert_one_line(error, "could not load", "its configs came from mimicshield's built-in SD 1.x")
