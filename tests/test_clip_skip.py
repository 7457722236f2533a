"""Clip skip: the text encoder layer prompts are read from, counted as A1111 and civitai count it.

``--clip-skip 1`` is the last layer (what diffusers does with ``clip_skip=None``), 2 the
penultimate; diffusers' ``clip_skip`` is one less. Checked against the hidden states computed
here by hand, against diffusers' own ``encode_prompt``, against the output of before, and in
every place that conditions on a prompt: protection, textual inversion, the mimicry pipelines,
the CLI, the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import WEIGHTS, requires_assets
from image_cases import noise
from PIL import Image
from typer.testing import CliRunner

from mimicshield import mimicry as M
from mimicshield.cli.errors import CLIError
from mimicshield.cli.main import app, main
from mimicshield.models import (
    ModelLoadError,
    diffusers_clip_skip,
    load_models,
    prompt_hidden_states,
)
from mimicshield.runner import OutputOptions, settings_id

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a painting of a fox"
CPU = {"device": "cpu", "dtype": "fp32", "local_files_only": True, "with_decoder": True}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir, tiny_family_dirs) -> dict:
    """The tiny SD 1.x and SDXL models (two text encoder layers each), with their decoders."""
    return {
        "sd1": load_models(str(tiny_model_dir), **CPU),
        "sdxl": load_models(str(tiny_family_dirs["sdxl"]), **CPU),
    }


def at(model, clip_skip: int):
    """The same model at another clip skip, with a cache of its own."""
    return dataclasses.replace(model, clip_skip=clip_skip, _prompt_cache={})


def ids(tokenizer, prompt: str = PROMPT) -> torch.Tensor:
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


# --- the numbering ---------------------------------------------------------------------------


def test_diffusers_counts_one_less_and_none_is_the_last_layer():
    assert diffusers_clip_skip(1) is None
    assert diffusers_clip_skip(2) == 1
    assert diffusers_clip_skip(3) == 2
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="diffusers' own clip_skip is one less"):
            diffusers_clip_skip(bad)


def test_prompt_hidden_states_picks_the_layers_by_hand():
    """The pure function on made-up hidden states: which entry, and whether it is normed."""
    states = tuple(torch.full((1, 2, 3), float(i)) for i in range(5))  # embeddings + 4 layers
    output = SimpleNamespace(hidden_states=states)

    def norm(x: torch.Tensor) -> torch.Tensor:  # stands for the final layer norm
        return x * 10

    assert prompt_hidden_states(output, 2, xl=False, final_layer_norm=norm).unique() == 30
    assert prompt_hidden_states(output, 3, xl=False, final_layer_norm=norm).unique() == 20
    assert prompt_hidden_states(output, 1, xl=True).unique() == 3  # the penultimate, no norm
    assert prompt_hidden_states(output, 2, xl=True).unique() == 2


# --- the maths, three ways -------------------------------------------------------------------


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd1_embedding_is_the_nth_last_hidden_state_through_the_final_norm(loaded, clip_skip):
    model = at(loaded["sd1"], clip_skip)
    encoder = model.text_encoder
    with torch.no_grad():
        states = encoder(ids(model.tokenizer), output_hidden_states=True).hidden_states
        expected = encoder.final_layer_norm(states[-clip_skip])
    torch.testing.assert_close(model.embed_prompt(PROMPT), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sdxl_embedding_is_both_encoders_n_plus_1_th_last_states_pooled_unchanged(
    loaded, clip_skip
):
    model = at(loaded["sdxl"], clip_skip)
    with torch.no_grad():
        first = model.text_encoder(ids(model.tokenizer), output_hidden_states=True)
        second = model.text_encoder_2(ids(model.tokenizer_2), output_hidden_states=True)
    index = -(clip_skip + 1)  # no final norm: SDXL was trained on the penultimate as it is
    expected = torch.cat([first.hidden_states[index], second.hidden_states[index]], dim=-1)
    cond = model.condition(PROMPT, 1, 32, 32)
    assert torch.equal(cond.hidden_states, expected)
    assert torch.equal(cond.pooled, second.text_embeds)  # the same at every clip skip


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_clip_skip_2_reads_another_layer(loaded, family):
    """Otherwise every comparison above could pass with clip skip ignored."""
    one, two = at(loaded[family], 1), at(loaded[family], 2)
    assert not torch.allclose(one.embed_prompt(PROMPT), two.embed_prompt(PROMPT))


def _diffusers_pipeline(model):
    """A diffusers text-to-image pipeline built directly from the model's own components."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    common = {
        "vae": model.vae,
        "text_encoder": model.text_encoder,
        "tokenizer": model.tokenizer,
        "unet": model.unet,
        "scheduler": DDIMScheduler(),
    }
    if model.is_xl:
        return StableDiffusionXLPipeline(
            **common, text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2
        )
    return StableDiffusionPipeline(
        **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_embedding_equals_diffusers_encode_prompt_with_clip_skip_one_less(
    loaded, family, clip_skip
):
    model = at(loaded[family], clip_skip)
    pipe = _diffusers_pipeline(model)
    # diffusers 0.42 reads text_encoder.text_model.final_layer_norm, which transformers 5.6 no
    # longer has on CLIPTextModel (diffusers issue 14124): the run the mimicry makes
    with M._final_norm_where_diffusers_looks(pipe.text_encoder), torch.no_grad():
        theirs = pipe.encode_prompt(
            PROMPT,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=clip_skip - 1 or None,
        )
    cond = model.condition(PROMPT, 1, 32, 32)
    assert torch.equal(cond.hidden_states, theirs[0])
    if model.is_xl:
        assert torch.equal(cond.pooled, theirs[2])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_clip_skip_1_is_bit_identical_to_the_conditioning_of_before(loaded, family):
    """What embed_prompt computed before clip skip existed, written out as it was."""
    model = at(loaded[family], 1)
    with torch.no_grad():
        if not model.is_xl:
            before = model.text_encoder(ids(model.tokenizer))[0]
            assert torch.equal(model.embed_prompt(PROMPT), before)
            return
        first = model.text_encoder(ids(model.tokenizer), output_hidden_states=True)
        second = model.text_encoder_2(ids(model.tokenizer_2), output_hidden_states=True)
    before = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    cond = model.condition(PROMPT, 1, 32, 32)
    assert torch.equal(cond.hidden_states, before)
    assert torch.equal(cond.pooled, second[0])


def test_the_prompt_cache_keys_on_clip_skip(loaded):
    """``dataclasses.replace`` shares the cache dict: each clip skip must still get its own."""
    model = at(loaded["sd1"], 1)
    first = model.embed_prompt(PROMPT)
    other = dataclasses.replace(model, clip_skip=2)  # the same dict
    assert other._prompt_cache is model._prompt_cache
    assert not torch.equal(other.embed_prompt(PROMPT), first)
    assert torch.equal(model.embed_prompt(PROMPT), first)


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_textual_inversion_conditions_as_embed_prompt(loaded, family, clip_skip):
    """The encoder copies TI trains, on a prompt without the new token, give c exactly."""
    model = at(loaded[family], clip_skip)
    pairs = [(model.tokenizer, model.text_encoder)]
    if model.is_xl:
        pairs.append((model.tokenizer_2, model.text_encoder_2))
    placeholders = [M._Placeholder.add(t, e, M.TI_TOKEN, "art") for t, e in pairs]
    token_ids = [model._tokens(p.tokenizer, PROMPT) for p in placeholders]
    with torch.no_grad():
        cond = M._ti_conditioning(model, placeholders, token_ids, (32, 48))
    expected = model.condition(PROMPT, 1, 32, 48)
    if not model.is_xl:
        assert torch.equal(cond, expected.hidden_states)
        return
    assert torch.equal(cond.hidden_states, expected.hidden_states)
    assert torch.equal(cond.pooled, expected.pooled)
    assert torch.equal(cond.time_ids, expected.time_ids)


def test_load_models_takes_clip_skip_and_refuses_what_the_encoder_lacks(tiny_model_dir):
    assert load_models(str(tiny_model_dir), **CPU, clip_skip=2).clip_skip == 2
    with pytest.raises(ValueError, match="at least 1"):
        load_models(str(tiny_model_dir), **CPU, clip_skip=0)
    with pytest.raises(ModelLoadError) as error:  # two layers: 3 is the embeddings' output
        load_models(str(tiny_model_dir), **CPU, clip_skip=4)
    assert "\n" not in str(error.value)
    assert "the most it takes is 3" in str(error.value)


# --- the mimicry's diffusers pipelines -------------------------------------------------------


@pytest.fixture
def pipeline_calls(monkeypatch) -> list[dict]:
    """Every diffusers pipeline the mimicry runs records its arguments instead of running;
    with each, whether the text encoder's final norm was where diffusers looks for it."""
    calls: list[dict] = []

    def fake_call(pipe, **kwargs):
        norm = getattr(getattr(pipe.text_encoder, "text_model", None), "final_layer_norm", None)
        calls.append({**kwargs, "norm_found": norm is not None})
        height = kwargs.get("height") or kwargs["image"].shape[-2]
        width = kwargs.get("width") or kwargs["image"].shape[-1]
        return SimpleNamespace(images=torch.zeros(1, 3, height, width))

    for names in M.PIPELINES.values():
        for name in names:
            monkeypatch.setattr(getattr(__import__("diffusers"), name), "__call__", fake_call)
    return calls


@pytest.mark.parametrize(
    ("family", "clip_skip", "expected"),
    # the tiny SDXL encoders have hidden states up to clip skip 2
    [("sd1", 1, None), ("sd1", 2, 1), ("sd1", 3, 2), ("sdxl", 1, None), ("sdxl", 2, 1)],
)
def test_mimicry_pipelines_get_diffusers_clip_skip(
    loaded, pipeline_calls, family, clip_skip, expected
):
    model = at(loaded[family], clip_skip)
    images = torch.rand(1, 3, 32, 32)
    M.img2img(model, images, 0.5, num_inference_steps=2)
    M.inpaint(model, images, num_inference_steps=2)
    M.generate(model, PROMPT, 2, 32, 32, num_inference_steps=2)  # TI and LoRA samples
    assert len(pipeline_calls) == 4
    assert [call["clip_skip"] for call in pipeline_calls] == [expected] * 4
    assert all(call["norm_found"] for call in pipeline_calls)
    assert not hasattr(model.text_encoder, "text_model")  # the alias lasts the run only


def test_an_sd1_pipeline_really_runs_with_clip_skip_2(loaded):
    """Unpatched: diffusers' own SD 1.x pipeline, which fails on transformers 5.6's flattened
    CLIPTextModel without the alias, runs and leaves the text encoder as it was."""
    model = at(loaded["sd1"], 2)
    keys = set(model.text_encoder.state_dict())
    out = M.img2img(model, torch.rand(1, 3, 32, 32), 0.5, num_inference_steps=2)
    assert out.shape == (1, 3, 32, 32) and out.isfinite().all()
    assert set(model.text_encoder.state_dict()) == keys
    assert not hasattr(model.text_encoder, "text_model")


# --- the command line --------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise(16, 16, seed=3)).save(folder / "art.png")
    return folder


@pytest.fixture
def model_never_loads(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("the model was loaded before the bad --clip-skip was found")

    monkeypatch.setattr("mimicshield.models.load_models", refuse)


def _commands(folder, tmp_path) -> dict[str, list[str]]:
    clean = str(folder)
    return {
        "protect": ["protect", clean, "-o", str(tmp_path / "p")],
        "mimic": ["mimic", clean, "-o", str(tmp_path / "m")],
        "evaluate": ["evaluate", clean, clean, "-o", str(tmp_path / "e")],
        "purify": ["purify", clean, "-o", str(tmp_path / "u"), "-m", "sdedit", "--model", clean],
        "ui": ["ui"],
    }


@pytest.mark.parametrize("command", ["protect", "mimic", "evaluate", "purify", "ui"])
def test_clip_skip_0_is_one_line_before_the_model_loads(
    model_never_loads, image_folder, tmp_path, command
):
    args = [*_commands(image_folder, tmp_path)[command], "--clip-skip", "0"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, CLIError), (result.exception, result.output)
    message = str(result.exception)
    assert "\n" not in message
    assert message.startswith("--clip-skip must be")
    assert "diffusers' own clip_skip is one less" in message


def test_clip_skip_0_exits_non_zero_without_a_traceback(
    model_never_loads, image_folder, tmp_path, monkeypatch, capsys
):
    args = _commands(image_folder, tmp_path)["protect"]
    monkeypatch.setattr(sys, "argv", ["mimicshield", *args, "--clip-skip", "0"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "MIMICSHIELD_DEBUG" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("Error: --clip-skip must be")


def test_an_ensemble_needs_one_clip_skip_per_model(model_never_loads, image_folder, tmp_path):
    args = _commands(image_folder, tmp_path)["protect"]
    models = ["--model", "a", "--model", "b"]
    result = CliRunner().invoke(app, [*args, *models, "--clip-skip", "2"])
    assert isinstance(result.exception, CLIError)
    assert "--clip-skip: give one value per --model (2" in str(result.exception)


@pytest.fixture
def fake_loader(monkeypatch, tiny_model, tiny_model_with_decoder) -> list[dict]:
    """``load_models`` hands back the tiny model at the clip skip asked for; records the calls."""
    calls: list[dict] = []

    def load(source, **kwargs):
        calls.append({"source": source, **kwargs})
        base = tiny_model_with_decoder if kwargs.get("with_decoder") else tiny_model
        return at(base, kwargs.get("clip_skip", 1))

    monkeypatch.setattr("mimicshield.models.load_models", load)
    return calls


FAST = ["--method", "sds-", "--steps", "1", "--work-size", "native", "--device", "cpu"]
FAST += ["--dtype", "fp32"]


def test_protect_records_clip_skip_and_a_rerun_with_another_does_not_resume(
    fake_loader, image_folder, tmp_path
):
    out = tmp_path / "out"
    args = ["protect", str(image_folder), "-o", str(out), *FAST]
    result = CliRunner().invoke(app, [*args, "--clip-skip", "2"])
    assert result.exit_code == 0, result.output
    assert fake_loader[0]["clip_skip"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["clip_skip"] == 2
    again = CliRunner(env={"COLUMNS": "300"}).invoke(app, args)  # clip skip 1 this time
    assert again.exit_code != 0
    assert "clip_skip 2 -> 1" in again.output


def test_protect_ensemble_takes_one_clip_skip_per_model(fake_loader, image_folder, tmp_path):
    out = tmp_path / "out"
    models = ["--model", "first", "--model", "second", "--clip-skip", "2", "--clip-skip", "1"]
    args = ["protect", str(image_folder), "-o", str(out), *FAST, *models]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [(c["source"], c["clip_skip"]) for c in fake_loader] == [("first", 2), ("second", 1)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["clip_skip"] == [2, 1]


def test_clip_skip_1_keeps_the_settings_of_runs_made_before_it_was_recorded():
    """A manifest written before clip skip existed resumes: the default leaves the id as it was."""
    protector = SimpleNamespace(config=SimpleNamespace(to_dict=lambda: {"steps": 1}))
    options = OutputOptions()
    old = {"model": "m", "parameters": {"steps": 1}}
    for default in (1, [1, 1]):
        new = {"model": "m", "parameters": {"steps": 1, "clip_skip": default}}
        assert settings_id(protector, options, new) == settings_id(protector, options, old)
    changed = {"model": "m", "parameters": {"steps": 1, "clip_skip": 2}}
    assert settings_id(protector, options, changed) != settings_id(protector, options, old)


MIMIC = ["--strengths", "0.1", "--resolution", "32", "--sample-steps", "1"]
MIMIC += ["--device", "cpu", "--dtype", "fp32"]


def test_mimic_loads_both_models_at_clip_skip_and_records_it(fake_loader, image_folder, tmp_path):
    """The attacker's inpainting model is prompted as the main model is."""
    out = tmp_path / "out"
    args = ["mimic", str(image_folder), "-o", str(out), "-s", "sdedit-onestep,inpaint", *MIMIC]
    result = CliRunner().invoke(app, [*args, "--inpaint-model", "inpainter", "--clip-skip", "2"])
    assert result.exit_code == 0, result.output
    assert [(c["source"], c["clip_skip"]) for c in fake_loader][1:] == [("inpainter", 2)]
    assert fake_loader[0]["clip_skip"] == 2
    assert json.loads((out / "mimic.json").read_text())["clip_skip"] == 2


@requires_assets
def test_evaluate_records_clip_skip_in_its_settings(
    fake_loader, image_folder, tmp_path, monkeypatch
):
    monkeypatch.setattr("mimicshield.models.check_model_source", lambda source: None)
    copy = tmp_path / "copy"
    shutil.copytree(image_folder, copy)  # a "protection" that changes nothing
    out = tmp_path / "ev"
    args = ["evaluate", str(image_folder), str(copy), "-o", str(out), "-s", "sdedit-onestep"]
    args += [*MIMIC, "--lpips-weights", str(WEIGHTS / "lpips_alexnet.safetensors")]
    args += ["--thumbnail-size", "16"]
    result = CliRunner().invoke(app, [*args, "--model", "m", "--clip-skip", "2"])
    assert result.exit_code == 0, result.output
    assert [call["clip_skip"] for call in fake_loader] == [2]
    document = json.loads((out / "metrics.json").read_text())
    assert document["settings"]["clip_skip"] == 2


def test_purify_sdedit_runs_and_records_clip_skip(fake_loader, image_folder, tmp_path):
    out = tmp_path / "purified"
    args = ["purify", str(image_folder), "-o", str(out), "-m", "sdedit,jpeg75", "--model", "m"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--clip-skip", "2"])
    assert result.exit_code == 0, result.output
    assert [call["clip_skip"] for call in fake_loader] == [2]
    record = json.loads((out / "purify.json").read_text())
    described = {p["name"]: p["parameters"] for p in record["purifications"]}
    assert described["sdedit"]["clip_skip"] == 2
    assert "clip_skip" not in described["jpeg75"]  # reads no prompt


def test_the_web_apps_settings_take_clip_skip_into_the_model_key():
    from mimicshield.webapp.settings import ProtectSettings

    plain, skipped = ProtectSettings(model="m"), ProtectSettings(model="m", clip_skip=2)
    assert skipped.clip_skip == (2,)
    assert plain.model_key != skipped.model_key
    assert ProtectSettings(model="a\nb", clip_skip=2).clip_skip == (2, 2)  # ui's one value
    with pytest.raises(ValueError, match="at least 1"):
        ProtectSettings(model="m", clip_skip=0)
    with pytest.raises(ValueError, match="one value per model"):
        ProtectSettings(model="a\nb\nc", clip_skip=(2, 1))


def test_the_page_reads_its_clip_skip_box():
    from mimicshield.webapp.page import _page_clip_skips

    assert _page_clip_skips("2") == (2,)
    assert _page_clip_skips("2\n1") == (2, 1)
    assert _page_clip_skips("") == (1,)
    assert _page_clip_skips((2,)) == (2,)  # the defaults, as the page shows them
    with pytest.raises(ValueError, match="^Clip skip: enter whole numbers; got two.$"):
        _page_clip_skips("two")
