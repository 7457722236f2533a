"""SDEdit mimicry (and SDEdit purification) on SD 2.x-v and SDXL tiny random models.

SDEdit conditions the UNet through ``model.condition`` at the image's pixel size, so SDXL gets
its pooled embedding and the time ids of an uncropped image of that size; the pipeline-based
scenarios refuse SDXL in one line. Plumbing only: the models are random.
"""

from __future__ import annotations

import pytest
import torch

from mimicshield import mimicry as M
from mimicshield.models import load_models
from mimicshield.purify import sdedit_purify
from mimicshield.testing import save_tiny_family_model

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = {"device": "cpu", "dtype": "fp32", "local_files_only": True, "with_decoder": True}
HEIGHT, WIDTH = 48, 32  # not square, so the time ids show which side is which


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimicry-families")
    return {
        name: load_models(str(save_tiny_family_model(root / name, name)), **CPU)
        for name in ("sd2-v", "sdxl")
    }


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


def test_mimicry_runs_sdedit_on_sdxl_and_refuses_its_pipelines_in_one_line(models, images):
    model = models["sdxl"]
    settings = M.MimicrySettings(sdedit_steps=100, sdedit_strengths=(0.01,))
    out = M.Mimicry(model, settings).run(M.Variant("sdedit-onestep", 0.01), images[0])
    assert out.shape == images[0].shape
    with pytest.raises(ValueError, match="not SDXL yet") as error:
        M.Mimicry(model, settings).run(M.Variant("img2img", 0.3), images[0])
    assert "\n" not in str(error.value)
    for learn in (M.textual_inversion_mimicry, M.lora_mimicry):
        with pytest.raises(ValueError, match="not SDXL yet"):
            learn(model, images)


def test_sdedit_purification_works_on_sdxl(models):
    odd = torch.rand(1, 3, 30, 21, generator=torch.Generator().manual_seed(6))
    out = sdedit_purify(odd, models["sdxl"], strength=0.01, seed=2)
    assert out.shape == odd.shape
    torch.testing.assert_close(sdedit_purify(odd, models["sdxl"], strength=0.01, seed=2), out)
