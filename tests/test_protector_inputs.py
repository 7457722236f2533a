"""Protector's input checks and state: the API review's items."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimicshield.images import from_pil
from mimicshield.protector import Protector


@pytest.fixture
def x():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_reassigned_target_is_used(tiny_model, x):
    kw = dict(method="photoguard", steps=2, random_start=False)
    p = Protector(tiny_model, target=torch.zeros(3, 32, 32), **kw)
    p(x)
    p.target = torch.ones(3, 32, 32)
    fresh = Protector(tiny_model, target=torch.ones(3, 32, 32), **kw)(x)
    assert torch.equal(p(x), fresh)


def test_nan_refused(tiny_model, x):
    x[0, :, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        Protector(tiny_model, steps=1)(x)


def test_sixteen_bit_and_float_pil():
    ramp = np.linspace(0, 1, 40 * 48).reshape(40, 48)
    im16 = Image.fromarray((ramp * 65535).astype(np.uint16))
    assert torch.allclose(from_pil(im16)[0], torch.from_numpy(ramp).float(), atol=1e-4)
    imf = Image.fromarray(ramp.astype(np.float32))
    assert torch.allclose(from_pil(imf)[1], torch.from_numpy(ramp).float(), atol=1e-6)
    with pytest.raises(ValueError, match="'F'"):
        from_pil(Image.fromarray((ramp * 255).astype(np.float32)))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_works_without_grad(tiny_model, x, mode):
    expected = Protector(tiny_model, steps=1)(x)
    with mode():
        assert torch.equal(Protector(tiny_model, steps=1)(x.clone()), expected)


def test_paths_refused(tiny_model, tiny_model_dir, x):
    with pytest.raises(TypeError, match="load_models"):
        Protector(str(tiny_model_dir))
    with pytest.raises(TypeError, match="target"):
        Protector(tiny_model, method="photoguard", target=Path("img.png"))
    with pytest.raises(TypeError, match="protect_files"):
        Protector(tiny_model, steps=1)("img.png")


@pytest.mark.parametrize("seed", [-1, 1.5, True, 2**64])
def test_seeds_checked_like_seed(tiny_model, x, seed):
    with pytest.raises(ValueError, match="between 0 and"):
        Protector(tiny_model, seed=seed)
    with pytest.raises(ValueError, match="between 0 and"):
        Protector(tiny_model, steps=1)(x, seeds=[seed])


def test_output_keeps_dtype(tiny_model, x):
    assert Protector(tiny_model, steps=1)(x.double()).dtype == torch.float64


def test_unused_target_warns(tiny_model):
    with pytest.warns(UserWarning, match="sds-"):
        Protector(tiny_model, method="sds-", target=torch.rand(3, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Protector(tiny_model, method="photoguard", target=torch.rand(3, 16, 16))


@pytest.mark.parametrize("prompt", [None, ["a", "b"]])
def test_prompt_must_be_str(tiny_model, prompt):
    with pytest.raises(TypeError, match="prompt"):
        Protector(tiny_model, prompt=prompt)


def test_lazy_names_in_dir():
    import mimicshield

    assert "Protector" in dir(mimicshield)


def test_an_inpainting_model_is_refused_with_one_line(tmp_path):
    """A 9-channel inpainting UNet used to fail deep in the UNet (a 9-vs-4 channel conv)."""
    from mimicshield.models import load_models
    from mimicshield.testing import save_tiny_inpainting_model

    folder = save_tiny_inpainting_model(tmp_path / "inpaint")
    model = load_models(str(folder), inpainting=True, device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="plain \\(text-to-image\\) model") as error:
        Protector(model, steps=1)
    assert "\n" not in str(error.value)


def test_a_reassigned_model_is_used(tiny_model_dir, tmp_path, x):
    """The cached target latent is E(y) of one model: another model needs its own."""
    from mimicshield.models import load_models
    from mimicshield.testing import save_tiny_stable_diffusion

    other = load_models(
        str(save_tiny_stable_diffusion(tmp_path / "other", seed=1)), device="cpu", dtype="fp32"
    )
    first = load_models(str(tiny_model_dir), device="cpu", dtype="fp32")
    kw = dict(method="photoguard", target=torch.zeros(3, 32, 32), steps=2, random_start=False)
    p = Protector(first, **kw)
    p(x)
    p.model = other
    assert torch.equal(p(x), Protector(other, **kw)(x))
