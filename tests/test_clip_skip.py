"""Clip skip: the text encoder layer prompts are read from, counted as A1111 and civitai count it.

``--clip-skip 1`` is the last layer (what diffusers does with ``clip_skip=None``), 2 the
penultimate; diffusers' ``clip_skip`` is one less. Checked against the hidden states computed
here by hand, against diffusers' own ``encode_prompt``, against the output of before, and in
every place that conditions on a prompt: protection, textual inversion, the mimicry pipelines
(both halves of classifier-free guidance: the prompt and the negative one), the CLI, the
manifest.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from contextlib import contextmanager
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


@contextmanager
def _final_norm_where_diffusers_looks(text_encoder):
    """diffusers 0.42 reads ``text_encoder.text_model.final_layer_norm`` for a clip skip, which
    transformers 5.6 no longer has on ``CLIPTextModel`` (diffusers issue 14124): an alias for
    comparing with its ``encode_prompt`` (the mimicry passes embeddings and needs none)."""
    if hasattr(text_encoder, "text_model"):
        yield
        return
    text_encoder.text_model = SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm)
    try:
        yield
    finally:
        del text_encoder.text_model


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_embedding_equals_diffusers_encode_prompt_with_clip_skip_one_less(
    loaded, family, clip_skip
):
    model = at(loaded[family], clip_skip)
    pipe = _diffusers_pipeline(model)
    with _final_norm_where_diffusers_looks(pipe.text_encoder), torch.no_grad():
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


def weights_never_load(monkeypatch) -> None:
    """Every loader of a component (and of a single file's weights) fails the test."""
    import diffusers
    import transformers

    def refuse(*args, **kwargs):
        pytest.fail("a component loaded before the too-deep clip skip was refused")

    for cls in (
        diffusers.DDPMScheduler,
        diffusers.AutoencoderKL,
        diffusers.UNet2DConditionModel,
        transformers.CLIPTextModel,
        transformers.CLIPTextModelWithProjection,
    ):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    for pipeline in (diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline):
        monkeypatch.setattr(pipeline, "from_single_file", refuse)


def _refusal(source: str, clip_skip: int, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as error:
        load_models(source, **CPU, clip_skip=clip_skip, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("family", "clip_skip", "most"),
    [("sd1", 4, 3), ("sdxl", 3, 2)],  # two layers each; SDXL starts one up
)
def test_a_too_deep_clip_skip_is_refused_from_the_configs_before_any_weight_loads(
    tiny_model_dir, tiny_family_dirs, family, clip_skip, most, monkeypatch
):
    folder = str(tiny_model_dir if family == "sd1" else tiny_family_dirs[family])
    with monkeypatch.context() as patched:
        weights_never_load(patched)
        early = _refusal(folder, clip_skip)
    assert f"{folder}: clip skip {clip_skip} is deeper than its text_encoder (2 layers)" in early
    assert f"the most it takes is {most}" in early
    # the same line as the check on the loaded encoders, kept for configs that cannot be read
    monkeypatch.setattr("mimicshield.models._component_config", lambda *args: None)
    assert _refusal(folder, clip_skip) == early


def test_sdxl_second_encoder_is_checked_from_its_config(tiny_family_dirs, tmp_path, monkeypatch):
    from mimicshield.testing import copy_tiny_model

    folder = copy_tiny_model(
        tiny_family_dirs["sdxl"], tmp_path / "xl", text_encoder={"num_hidden_layers": 5}
    )
    weights_never_load(monkeypatch)
    assert "its text_encoder_2 (2 layers)" in _refusal(str(folder), 3)


def test_a_hub_ids_clip_skip_is_refused_from_its_cached_text_encoder_config(
    tiny_model_dir, hub_cache, monkeypatch
):
    """Only the index and the encoder's config.json are in the cache: nothing else is read."""
    snapshot = hub_cache / "models--org--tiny" / "snapshots" / ("0" * 40)
    for name in ("model_index.json", "text_encoder/config.json"):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes((tiny_model_dir / name).read_bytes())
    (hub_cache / "models--org--tiny" / "refs").mkdir()
    (hub_cache / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    weights_never_load(monkeypatch)
    assert _refusal("org/tiny", 4).startswith("org/tiny: clip skip 4 is deeper than its")


def test_a_too_deep_clip_skip_of_a_single_file_is_refused_before_its_weights_are_read(
    tiny_model_dir, tmp_path, hub_cache, monkeypatch
):
    """From the configs it would be built with: a ``--model-config`` folder's, or the built-in
    ones (SD 1.x: CLIP ViT-L's 12 layers), offline with nothing cached."""
    from mimicshield.configs import Vocabulary
    from mimicshield.testing import copy_tiny_model, save_tiny_single_file

    path = save_tiny_single_file(tiny_model_dir, tmp_path / "tiny.safetensors")
    config = copy_tiny_model(tiny_model_dir, tmp_path / "config", weights=False)
    weights_never_load(monkeypatch)
    given = _refusal(str(path), 4, single_file_config=str(config))
    assert f"{path}: clip skip 4 is deeper than its text_encoder (2 layers)" in given
    vocabulary = Vocabulary(b"{}", b"", "a test")  # never read: nothing is built
    monkeypatch.setattr("mimicshield.models._builtin_vocabulary", lambda *args: vocabulary)
    builtin = _refusal(str(path), 14)
    assert "text_encoder (12 layers) goes; the most it takes is 13" in builtin


# --- the mimicry's diffusers pipelines -------------------------------------------------------


@pytest.fixture
def pipeline_calls(monkeypatch) -> list[dict]:
    """Every diffusers pipeline the mimicry runs records its arguments instead of running."""
    calls: list[dict] = []

    def fake_call(pipe, **kwargs):
        calls.append(kwargs)
        height = kwargs.get("height") or kwargs["image"].shape[-2]
        width = kwargs.get("width") or kwargs["image"].shape[-1]
        return SimpleNamespace(images=torch.zeros(1, 3, height, width))

    for names in M.PIPELINES.values():
        for name in names:
            monkeypatch.setattr(getattr(__import__("diffusers"), name), "__call__", fake_call)
    return calls


def _run_every_pipeline(model, **kwargs) -> None:
    """img2img, inpainting and text-to-image (the TI and LoRA samples), two steps each."""
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    M.img2img(model, images, 0.5, prompt=PROMPT, num_inference_steps=2, **kwargs)
    M.inpaint(model, images, prompt=PROMPT, num_inference_steps=2, **kwargs)
    M.generate(model, PROMPT, 1, 32, 32, num_inference_steps=2, **kwargs)


@pytest.mark.parametrize(
    ("family", "clip_skip"),
    # the tiny SDXL encoders have hidden states up to clip skip 2
    [("sd1", 1), ("sd1", 2), ("sd1", 3), ("sdxl", 1), ("sdxl", 2)],
)
def test_mimicry_pipelines_get_both_prompts_embedded_at_the_models_clip_skip(
    loaded, pipeline_calls, family, clip_skip
):
    """Not diffusers' prompt and clip_skip, which encode the negative prompt at the last layer:
    the embeddings of ``model.condition``, the negative prompt's too (SDXL's: zeros)."""
    model = at(loaded[family], clip_skip)
    _run_every_pipeline(model)
    assert len(pipeline_calls) == 3
    want = model.condition(PROMPT, 1, 32, 32)
    for call in pipeline_calls:
        assert "prompt" not in call and "clip_skip" not in call and "negative_prompt" not in call
        assert torch.equal(call["prompt_embeds"], want.hidden_states)
        if not model.is_xl:
            assert torch.equal(call["negative_prompt_embeds"], model.embed_prompt(""))
            continue
        assert torch.equal(call["pooled_prompt_embeds"], want.pooled)
        assert not call["negative_prompt_embeds"].any()  # force_zeros_for_empty_prompt
        assert not call["negative_pooled_prompt_embeds"].any()
        assert call["original_size"] == call["target_size"] == (32, 32)
        assert call["crops_coords_top_left"] == (0, 0)


def _spy_unet(model, monkeypatch) -> list[torch.Tensor]:
    """The encoder_hidden_states of every UNet call; the UNet still runs."""
    seen: list[torch.Tensor] = []
    forward = model.unet.forward

    def spy(sample, timestep, *args, **kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())
        return forward(sample, timestep, *args, **kwargs)

    monkeypatch.setattr(model.unet, "forward", spy)
    return seen


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_guidance_conditions_the_unet_on_both_prompts_at_clip_skip_2(loaded, family, monkeypatch):
    """With guidance (7.5) each UNet call gets the batch (negative, prompt): for SD 1.x/2.x both
    at layer 2, as A1111 and ComfyUI encode them, not the negative at layer 1 as diffusers 0.42
    does with its clip_skip; for SDXL the prompt at its clip skip 2 and the zero negative."""
    model = at(loaded[family], 2)
    seen = _spy_unet(model, monkeypatch)
    _run_every_pipeline(model, guidance_scale=7.5)
    assert len(seen) == 1 + 2 + 2  # img2img runs half its two steps at strength 0.5
    prompt = model.embed_prompt(PROMPT)
    negative = model.embed_prompt("")
    at_layer_1 = at(loaded[family], 1)
    assert not torch.allclose(prompt, at_layer_1.embed_prompt(PROMPT))  # the layer matters
    for hidden in seen:
        assert hidden.shape == (2, *prompt.shape[1:])
        assert torch.equal(hidden[1:], prompt)
        if model.is_xl:
            assert not hidden[0].any()
            continue
        assert torch.equal(hidden[:1], negative)
        assert not torch.allclose(hidden[:1], at_layer_1.embed_prompt(""))


def _diffusers_encodes_the_prompt(model, prompt: str, height: int, width: int) -> dict:
    """The pipeline arguments of before: the prompt itself, encoded by diffusers at its default
    clip_skip (None: the last layer), and SDXL's time ids of an uncropped image."""
    if not model.is_xl:
        return {"prompt": prompt}
    size = (height, width)
    return {
        "prompt": prompt,
        "original_size": size,
        "crops_coords_top_left": (0, 0),
        "target_size": size,
    }


def _ti_copies(model) -> dict:
    """Textual inversion's copies of the text encoders, the new token's rows moved off their
    start, as generate gets them for the samples."""
    pairs = [("", model.tokenizer, model.text_encoder)]
    if model.is_xl:
        pairs.append(("_2", model.tokenizer_2, model.text_encoder_2))
    copies = {}
    for suffix, tokenizer, encoder in pairs:
        placeholder = M._Placeholder.add(tokenizer, encoder, M.TI_TOKEN, "art")
        with torch.no_grad():
            placeholder.weight[placeholder.token_id] += 0.5
        copies[f"tokenizer{suffix}"] = placeholder.tokenizer
        copies[f"text_encoder{suffix}"] = placeholder.text_encoder
    return copies


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_clip_skip_1_samples_are_bit_identical_to_diffusers_encoding_the_prompt(
    loaded, family, monkeypatch
):
    """The embeddings passed now, at clip skip 1, are what diffusers computed from the prompt:
    the same images to the bit, textual inversion's samples with the new token included."""
    model = at(loaded[family], 1)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ti_prompt = f"an image in the style of {M.TI_TOKEN}"
    copies = _ti_copies(model)

    def runs() -> list[torch.Tensor]:
        return [
            M.img2img(model, images, 0.5, prompt=PROMPT, num_inference_steps=4, seed=3),
            M.inpaint(model, images, prompt=PROMPT, num_inference_steps=2, seed=3),
            M.generate(model, PROMPT, 1, 32, 32, num_inference_steps=2, seed=3),
            M.generate(model, ti_prompt, 1, 32, 32, num_inference_steps=2, seed=3, **copies),
        ]

    now = runs()
    with monkeypatch.context() as patched:
        patched.setattr(M, "_conditioning_arguments", _diffusers_encodes_the_prompt)
        before = runs()
    for ours, theirs in zip(now, before, strict=True):
        assert torch.equal(ours, theirs)
    assert not torch.equal(now[2], now[3])  # the learned token reached the samples


def test_textual_inversion_samples_with_the_learned_token_at_clip_skip_2(loaded, monkeypatch):
    """The samples are conditioned through the trained copy, by ``encode_prompt_ids`` at the
    model's clip skip: the template with the learned token, and the empty negative prompt,
    both at layer 2 through the final norm."""
    model = at(loaded["sd1"], 2)
    generate, sampled_with = M.generate, []

    def spy_generate(*args, **kwargs):
        sampled_with.append(kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(M, "generate", spy_generate)
    seen = _spy_unet(model, monkeypatch)
    schedule = M.TrainingSchedule(steps=2, learning_rate=1e-2)
    _, learned = M.textual_inversion_mimicry(
        model, torch.rand(2, 3, 32, 32), schedule, num_samples=1, num_inference_steps=2
    )

    (used,) = sampled_with
    encoder, tokenizer = used["text_encoder"], used["tokenizer"]
    token_ids = ids(tokenizer, f"an image in the style of {M.TI_TOKEN}")
    assert tokenizer.convert_tokens_to_ids(M.TI_TOKEN) in token_ids[0].tolist()
    assert torch.equal(encoder.get_input_embeddings().weight[-1], learned)
    with torch.no_grad():
        states = encoder(token_ids, output_hidden_states=True).hidden_states
        prompt = encoder.final_layer_norm(states[-2])
        empty = encoder(ids(tokenizer, ""), output_hidden_states=True).hidden_states
        negative = encoder.final_layer_norm(empty[-2])
        last_layer = encoder(token_ids)[0]
    assert not torch.allclose(prompt, last_layer)
    sampling = seen[2:]  # after the two training steps
    assert len(sampling) == 2
    for hidden in sampling:
        torch.testing.assert_close(hidden[1:], prompt, rtol=0, atol=1e-6)
        torch.testing.assert_close(hidden[:1], negative, rtol=0, atol=1e-6)


def test_an_sd1_pipeline_really_runs_with_clip_skip_2(loaded):
    """Unpatched, diffusers' own SD 1.x pipeline runs on transformers 5.6's flattened
    CLIPTextModel (given embeddings, it never reaches for text_model.final_layer_norm) and
    leaves the text encoder as it was."""
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


def test_the_web_apps_settings_keep_clip_skip_out_of_the_model_key():
    """The weights are the same at every clip skip: the service reuses them (test_webapp)."""
    from mimicshield.webapp.settings import ProtectSettings

    plain, skipped = ProtectSettings(model="m"), ProtectSettings(model="m", clip_skip=2)
    assert skipped.clip_skip == (2,)
    assert plain.model_key == skipped.model_key
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
