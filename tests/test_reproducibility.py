"""Same seed, same bytes on CUDA too: deterministic mode and deterministic resampling.

No GPU runs this suite, so the CUDA side is checked the way it can be on the CPU: every
operation a protection step runs, forward and backward, is recorded at PyTorch's dispatcher,
and none may be one that PyTorch's deterministic mode refuses on CUDA (the list in
``torch.use_deterministic_algorithms``'s documentation, torch 2.13). Such an operation would
stop a deterministic run on a GPU with a RuntimeError. ``scripts/check_reproducibility.py``
checks the bytes themselves on a GPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mimicshield.methods import METHODS
from mimicshield.protector import Protector
from mimicshield.reproducibility import (
    CUBLAS_WORKSPACE_SETTING,
    CUBLAS_WORKSPACE_VARIABLE,
    configure_cublas_workspace,
    deterministic_algorithms,
    deterministic_mode_applies,
    deterministic_resampling,
    reflect_pad,
    separable_interpolate,
)

# Operations for which deterministic mode raises on CUDA tensors (their backward, where the
# documentation says "when attempting to differentiate").
REFUSED_ON_CUDA = {
    "aten.avg_pool3d_backward",
    "aten._adaptive_avg_pool2d_backward",
    "aten._adaptive_avg_pool3d_backward",
    "aten.adaptive_max_pool2d_backward",
    "aten.fractional_max_pool2d_backward",
    "aten.fractional_max_pool3d_backward",
    "aten.max_unpool2d",
    "aten.max_unpool3d",
    "aten.upsample_linear1d_backward",
    "aten.upsample_bilinear2d_backward",
    "aten.upsample_bicubic2d_backward",
    "aten.upsample_trilinear3d_backward",
    "aten._upsample_bilinear2d_aa_backward",
    "aten._upsample_bicubic2d_aa_backward",
    "aten.reflection_pad1d_backward",
    "aten.reflection_pad2d_backward",
    "aten.reflection_pad3d_backward",
    "aten.nll_loss2d_forward",
    "aten._ctc_loss_backward",
    "aten.put",
    "aten.put_",
    "aten.histc",
    "aten.bincount",
    "aten.median",
    "aten.grid_sampler_2d_backward",
    "aten.cumsum",
}


class RecordOperations(TorchDispatchMode):
    """Collects the name of every ATen operation run while active, backward passes included."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@contextmanager
def unet_modes(model):
    """Whether deterministic mode was on at each UNet call made inside the block."""
    modes: list[bool] = []
    original = model.unet.forward

    def forward(*args, **kwargs):
        modes.append(torch.are_deterministic_algorithms_enabled())
        return original(*args, **kwargs)

    model.unet.forward = forward
    try:
        yield modes
    finally:
        del model.unet.forward


def operations_of(run) -> set[str]:
    with RecordOperations() as recorder:
        run()
    return recorder.names


# --- deterministic mode --------------------------------------------------------------------------


def test_deterministic_mode_is_strict_inside_and_restored_after(monkeypatch):
    from torch.utils import deterministic as settings

    monkeypatch.delenv(CUBLAS_WORKSPACE_VARIABLE, raising=False)
    torch.use_deterministic_algorithms(True, warn_only=True)  # a caller's own setting
    try:
        with deterministic_algorithms():
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            assert settings.fill_uninitialized_memory is False
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert settings.fill_uninitialized_memory is True
    finally:
        torch.use_deterministic_algorithms(False)
    assert os.environ[CUBLAS_WORKSPACE_VARIABLE] == CUBLAS_WORKSPACE_SETTING


def test_deterministic_mode_is_restored_after_an_error():
    with pytest.raises(ValueError), deterministic_algorithms():
        raise ValueError("inside")
    assert not torch.are_deterministic_algorithms_enabled()


def test_disabled_leaves_the_mode_alone():
    with deterministic_algorithms(enabled=False):
        assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("callers", [False, True])
def test_cudnn_autotuning_is_off_in_the_mode_on_without_it_and_restored(callers, monkeypatch):
    # Autotuning picks convolution algorithms by timing, so the bytes could change between runs.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", callers)
    with deterministic_algorithms(device=torch.device("cpu")):
        assert torch.backends.cudnn.benchmark is False
    assert torch.backends.cudnn.benchmark is callers
    with deterministic_algorithms(enabled=False, device=torch.device("cpu")):
        assert torch.backends.cudnn.benchmark is True
    assert torch.backends.cudnn.benchmark is callers
    with pytest.raises(ValueError), deterministic_algorithms(enabled=False):
        raise ValueError("inside")
    assert torch.backends.cudnn.benchmark is callers


def test_the_mode_applies_on_cuda_and_the_cpu_but_not_on_mps():
    assert deterministic_mode_applies(torch.device("cuda"))
    assert deterministic_mode_applies(torch.device("cpu"))
    assert not deterministic_mode_applies(torch.device("mps"))
    with deterministic_algorithms(device=torch.device("mps")):  # nothing runs on it here
        assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(device=torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()


def test_a_users_cublas_setting_is_kept():
    environ = {CUBLAS_WORKSPACE_VARIABLE: ":16:8"}
    configure_cublas_workspace(environ)
    assert environ == {CUBLAS_WORKSPACE_VARIABLE: ":16:8"}
    environ = {}
    configure_cublas_workspace(environ)
    assert environ == {CUBLAS_WORKSPACE_VARIABLE: CUBLAS_WORKSPACE_SETTING}


def test_loading_sets_the_cublas_workspace_before_anything_runs(tiny_model_dir, monkeypatch):
    from mimicshield.models import load_models

    monkeypatch.delenv(CUBLAS_WORKSPACE_VARIABLE, raising=False)
    load_models(str(tiny_model_dir), device="cpu", dtype="fp32")
    assert os.environ[CUBLAS_WORKSPACE_VARIABLE] == CUBLAS_WORKSPACE_SETTING


def test_protector_runs_in_deterministic_mode_unless_told_not_to(tiny_model, images_8bit):
    seen = []
    original = tiny_model.encode

    def encode(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return original(*args, **kwargs)

    tiny_model.encode = encode
    try:
        Protector(tiny_model, "encoder", steps=2)(images_8bit)
        on = list(seen)
        seen.clear()
        Protector(tiny_model, "encoder", steps=2, deterministic=False)(images_8bit)
    finally:
        del tiny_model.encode
    assert on and all(on)
    assert seen and not any(seen)
    assert not torch.are_deterministic_algorithms_enabled()


# --- no operation that deterministic mode refuses on CUDA ---------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_step_avoids_operations_refused_on_cuda(tiny_model, images_8bit, name):
    names = operations_of(lambda: Protector(tiny_model, name, steps=1)(images_8bit))
    assert "aten.convolution_backward" in names  # the backward pass was recorded
    assert not names & REFUSED_ON_CUDA


@pytest.mark.parametrize("family", ["sd2-v", "sdxl"])
@pytest.mark.parametrize("name", ["sds-", "advdm+"])
def test_other_families_avoid_operations_refused_on_cuda(tmp_path, images_8bit, family, name):
    """SD 2.x (linear projections, v-prediction) and SDXL (two text encoders, pooled
    embedding, size conditioning): the encoder backward, and the UNet's for AdvDM."""
    from mimicshield.models import load_models
    from mimicshield.testing import save_tiny_family_model

    model = load_models(
        str(save_tiny_family_model(tmp_path / family, family)), device="cpu", dtype="fp32"
    )
    names = operations_of(lambda: Protector(model, name, steps=1)(images_8bit))
    assert "aten.convolution_backward" in names
    assert not names & REFUSED_ON_CUDA


@pytest.mark.parametrize("transform", ["jpeg", "resize", "blur", "noise"])
def test_robust_steps_avoid_operations_refused_on_cuda(tiny_model, images_8bit, transform):
    protector = Protector(tiny_model, "encoder", steps=1, robust=(transform,))
    names = operations_of(lambda: protector(images_8bit))
    assert "aten.convolution_backward" in names
    assert not names & REFUSED_ON_CUDA


def test_without_the_resampling_mode_the_transforms_would_be_refused():
    """The check above can fail: the plain resize and JPEG do use refused operations (the
    blur mirrors its borders by index selection, deterministic without the mode)."""
    from mimicshield.purify import gaussian_blur, rescale
    from mimicshield.robust import differentiable_jpeg

    for transform in (lambda x: rescale(x, 0.6), lambda x: differentiable_jpeg(x, 80)):
        x = torch.rand(1, 3, 32, 32, requires_grad=True)
        names = operations_of(lambda t=transform, x=x: t(x).sum().backward())
        assert names & REFUSED_ON_CUDA
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    assert not operations_of(lambda: gaussian_blur(x, 1.0).sum().backward()) & REFUSED_ON_CUDA


# --- the resampling itself ------------------------------------------------------------------------

INTERPOLATIONS = [
    dict(size=(18, 26), mode="bicubic", antialias=True),
    dict(size=(74, 106), mode="bicubic", antialias=True),
    dict(scale_factor=0.5, mode="bilinear", antialias=True),
    dict(scale_factor=2.0, mode="bilinear"),
    dict(size=(20, 60), mode="bilinear", align_corners=True),
    dict(scale_factor=(0.7, 1.3), mode="bicubic", recompute_scale_factor=True),
    dict(size=25, mode="bicubic"),
]


@pytest.mark.parametrize("options", INTERPOLATIONS)
def test_separable_interpolate_is_interpolate(options):
    x = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weights = torch.rand(F.interpolate(x, **options).shape)
    expected = F.interpolate(x, **options)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    got = separable_interpolate(x, **options)
    (grad,) = torch.autograd.grad((got * weights).sum(), x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pad", [(3, 3, 3, 3), (0, 5, 0, 7), (1, 2, 3, 0)])
def test_reflect_pad_is_reflection_padding(pad):
    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(0), requires_grad=True)
    expected = F.pad(x, pad, mode="reflect")
    weights = torch.rand(expected.shape)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    got = reflect_pad(x, pad)
    (grad,) = torch.autograd.grad((got * weights).sum(), x)
    assert torch.equal(got, expected)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)


def test_resampling_mode_reroutes_only_what_is_differentiated():
    x = torch.rand(1, 3, 20, 20)
    with deterministic_resampling():
        plain = F.interpolate(x, size=(10, 10), mode="bicubic", antialias=True)
        names = operations_of(lambda: F.pad(x, (2, 2, 2, 2), mode="reflect"))
        nearest_grad = operations_of(
            lambda: F.interpolate(x.requires_grad_(), scale_factor=2.0).sum().backward()
        )
    assert torch.equal(plain, F.interpolate(x, size=(10, 10), mode="bicubic", antialias=True))
    y = torch.rand(1, 3, 20, 20, requires_grad=True)
    with deterministic_resampling():  # keyword arguments, as F.interpolate takes them
        by_keyword = F.interpolate(input=y, size=(10, 10), mode="bilinear", antialias=True)
    expected = F.interpolate(y, size=(10, 10), mode="bilinear", antialias=True)
    torch.testing.assert_close(by_keyword, expected, atol=1e-6, rtol=0)
    assert by_keyword.grad_fn is not None and "Upsample" not in type(by_keyword.grad_fn).__name__
    assert "aten.reflection_pad2d" in names  # no gradient: PyTorch's own kernel
    assert "aten.upsample_nearest2d_backward" in nearest_grad  # not a refused mode: untouched


# --- mimicry simulations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scenario", ["sdedit-onestep", "sdedit-ddim", "img2img", "inpaint", "textual-inversion", "lora"]
)
def test_mimicry_runs_in_deterministic_mode_without_refused_operations(
    tiny_model_with_decoder, images_8bit, scenario, one_thread
):
    from mimicshield.mimicry import Mimicry, MimicrySettings, Variant

    settings = MimicrySettings(
        scenarios=[scenario], resolution=32, sample_steps=2, sdedit_steps=2, num_samples=1
    )
    settings.ti_steps = settings.lora_steps = 1
    mimicry = Mimicry(tiny_model_with_decoder, settings)
    variant = Variant(scenario, 0.5 if scenario.startswith(("sdedit", "img2img")) else None)
    with unet_modes(tiny_model_with_decoder) as modes:
        if scenario in ("textual-inversion", "lora"):
            names = operations_of(lambda: mimicry.run_set(variant, images_8bit))
        else:
            names = operations_of(lambda: mimicry.run(variant, images_8bit[0]))
    assert modes and all(modes)
    assert not names & REFUSED_ON_CUDA
    if scenario in ("textual-inversion", "lora"):
        assert "aten.convolution_backward" in names  # training: the backward pass was recorded


def test_purification_by_sdedit_runs_in_deterministic_mode(tiny_model_with_decoder, images_8bit):
    """``purify sdedit`` and the web app's check call ``sdedit`` outside :class:`Mimicry`."""
    from mimicshield.purify import sdedit_purify

    with unet_modes(tiny_model_with_decoder) as modes:
        sdedit_purify(images_8bit, tiny_model_with_decoder)
    assert modes and all(modes)
    assert not torch.are_deterministic_algorithms_enabled()
