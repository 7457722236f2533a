"""The same seed, inputs and device give the same protected bytes: on CUDA too.

Every step draws its randomness from seeded CPU generators (:class:`~mimicshield.Protector`),
so on the CPU a rerun gives identical bytes. On CUDA that is not enough: several kernels an
attack step runs add up their results with atomic operations, whose order changes from run to
run. The backward passes of flash and memory-efficient attention (the VAE encoder's mid-block,
in every method) are such kernels by default, and so can be cuDNN's convolution algorithms. A
last-bit difference flips the sign of a gradient component now and then, a sign step moves that
pixel the other way, and the difference grows over 100 steps: two runs of the same 512 px image
on an H200 gave different files (README, work-size measurement).

:func:`deterministic_algorithms` runs the protection under PyTorch's deterministic mode: the
attention backward passes then take their deterministic variants, cuDNN only deterministic
algorithms, and cuBLAS a fixed workspace. ``protect --nondeterministic`` opts out for the fastest
kernels, cuDNN's autotuned convolutions among them; ``mimicshield bench --nondeterministic``
measures what that saves (GPU figures pending).

Deterministic mode *refuses* the few operations that have no deterministic CUDA kernel, among
them the backward passes of bilinear and bicubic resampling and of reflection padding, which the
``--robust`` transforms (resize, blur, kornia's differentiable JPEG) differentiate through.
:func:`deterministic_resampling` computes those two operations as matrix products and index
selections instead: the same linear maps, with backward passes that are deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

CUBLAS_WORKSPACE_VARIABLE = "CUBLAS_WORKSPACE_CONFIG"
# One of the two settings cuBLAS documents for reproducible results (8 buffers of 4 MiB).
CUBLAS_WORKSPACE_SETTING = ":4096:8"


def configure_cublas_workspace(environ: MutableMapping[str, str] | None = None) -> None:
    """Give cuBLAS the fixed workspace that deterministic mode requires, unless the user chose
    one. (PyTorch raises on CUDA matrix products in deterministic mode without it.)"""
    environ = os.environ if environ is None else environ
    environ.setdefault(CUBLAS_WORKSPACE_VARIABLE, CUBLAS_WORKSPACE_SETTING)


def deterministic_mode_applies(device: torch.device) -> bool:
    """Deterministic mode is for CUDA (and harmless on the CPU, whose kernels already are).

    Not on Apple MPS: PyTorch specifies the mode for CPU and CUDA kernels, and no MPS machine
    tests it here; a refused operation there would stop a job that runs today.
    """
    return device.type in ("cuda", "cpu")


@contextmanager
def deterministic_algorithms(
    enabled: bool = True, *, device: torch.device | None = None
) -> Iterator[None]:
    """Run the block under PyTorch's deterministic mode, then restore the caller's settings.

    With ``device``, only where the mode applies (:func:`deterministic_mode_applies`).
    Strict, not ``warn_only``: only the strict mode switches flash and memory-efficient
    attention to their deterministic backward passes. Filling new tensors with NaN, which the
    mode does by default to expose reads of uninitialised memory, is turned off for the block:
    it costs a write of every new tensor, and nothing here reads memory it did not write.
    cuDNN's autotuning is off in the mode (:func:`cudnn_autotuning`).

    ``enabled=False`` asks for the fastest kernels instead: no deterministic mode, and cuDNN
    autotuning on.
    """
    if not enabled:
        with cudnn_autotuning(True):
            yield
        return
    if device is not None and not deterministic_mode_applies(device):
        yield
        return
    settings = _fill_settings()
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        settings.fill_uninitialized_memory if settings is not None else None,
    )
    configure_cublas_workspace()
    torch.use_deterministic_algorithms(True)
    if settings is not None:
        settings.fill_uninitialized_memory = False
    try:
        with cudnn_autotuning(False):
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        if settings is not None:
            settings.fill_uninitialized_memory = previous[2]


@contextmanager
def cudnn_autotuning(enabled: bool) -> Iterator[None]:
    """Set ``torch.backends.cudnn.benchmark`` for the block, then restore the caller's setting.

    With autotuning, cuDNN times its convolution algorithms for every new shape and keeps the
    fastest. The pick depends on those timings, so it can change from run to run, and with it
    the last bits of a convolution: deterministic mode needs it off (off is also PyTorch's
    default, but a caller may have turned it on), the non-deterministic mode takes the speed.
    No effect off CUDA.
    """
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _fill_settings():
    """``torch.utils.deterministic``, where this torch has it (2.2 and later)."""
    import importlib

    try:
        return importlib.import_module("torch.utils.deterministic")
    except ImportError:
        return None


# --- resampling and padding with deterministic backward passes ----------------------------------
# PyTorch's CUDA backward kernels for interpolate (linear family) and reflection padding scatter
# with atomics, and deterministic mode refuses them; no library offers deterministic ones. Both
# operations are linear and act on the rows and the columns separately, so each is a matrix per
# axis, read off by applying the operation itself to the identity: out = A_h @ x @ A_w^T. The
# weights are then exactly PyTorch's (antialiasing included); only the order of the additions
# differs, so results agree to rounding.

RESAMPLING_MODES = ("bilinear", "bicubic")


# The other axis is 2 pixels wide, not 1: PyTorch's antialiased kernels compute different
# weights for a 1-pixel axis (checked on torch 2.13).
_OTHER_AXIS = 2


def _for_axis(value, axis: int, other):
    """``size`` or ``scale_factor`` for resampling along one axis only (0: height, 1: width):
    the given value on that axis, ``other`` (unchanged) on the other."""
    if value is None:
        return None
    mine = value[axis] if isinstance(value, (tuple, list)) else value
    return (mine, other) if axis == 0 else (other, mine)


def _axis_matrix(length: int, axis: int, size, scale_factor, *, like: Tensor, **options) -> Tensor:
    """The (out, length) matrix of ``F.interpolate`` along one axis: its response to each
    basis vector, computed where ``like`` is and in its dtype (a float64 matrix built on the
    CPU cost 20-90 ms and a synchronising copy per matrix on a GPU, every EOT step, and MPS
    has no float64). The forward interpolation is deterministic on every device."""
    dtype = torch.promote_types(like.dtype, torch.float32)  # weights in at least fp32
    basis = torch.eye(length, dtype=dtype, device=like.device)
    if axis == 0:
        basis = basis[:, None, :, None].expand(length, 1, length, _OTHER_AXIS)
    else:
        basis = basis[:, None, None, :].expand(length, 1, _OTHER_AXIS, length)
    out = F.interpolate(
        basis.contiguous(),
        size=_for_axis(size, axis, _OTHER_AXIS),
        scale_factor=_for_axis(scale_factor, axis, 1.0),
        **options,
    )
    response = out[..., 0] if axis == 0 else out[:, :, 0, :]
    return response.reshape(length, -1).T.to(like.dtype)


def separable_interpolate(
    input: Tensor,
    size=None,
    scale_factor=None,
    mode: str = "bilinear",
    align_corners: bool | None = None,
    recompute_scale_factor: bool | None = None,
    antialias: bool = False,
) -> Tensor:
    """``F.interpolate`` of an (N, C, H, W) ``input`` in the bilinear or bicubic mode, as two
    matrix products, whose backward is deterministic. The arguments are ``F.interpolate``'s."""
    options = dict(
        mode=mode,
        align_corners=align_corners,
        recompute_scale_factor=recompute_scale_factor,
        antialias=antialias,
    )
    height, width = input.shape[-2:]
    rows = _axis_matrix(height, 0, size, scale_factor, like=input, **options)
    columns = _axis_matrix(width, 1, size, scale_factor, like=input, **options)
    return rows @ input @ columns.T


def _reflect_indices(length: int, before: int, after: int, device) -> Tensor:
    """Source index of each padded position under reflection (the edge itself not repeated)."""
    positions = torch.arange(-before, length + after, device=device)  # made there: no copy
    period = 2 * (length - 1)
    folded = positions.remainder(period) if period > 0 else torch.zeros_like(positions)
    return torch.where(folded < length, folded, period - folded)


def reflect_pad(x: Tensor, pad: tuple[int, ...]) -> Tensor:
    """``F.pad(x, pad, mode="reflect")`` for the last two axes, as index selections, whose
    backward is deterministic in deterministic mode."""
    left, right, top, bottom = pad
    height, width = x.shape[-2:]
    x = x.index_select(-1, _reflect_indices(width, left, right, x.device))
    return x.index_select(-2, _reflect_indices(height, top, bottom, x.device))


class _DeterministicResampling(TorchFunctionMode):
    """Routes differentiated 4-D interpolate and reflection padding to the versions above."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        differentiated = isinstance(x, Tensor) and x.requires_grad and x.ndim == 4
        if differentiated and func is F.interpolate:
            mode = args[3] if len(args) > 3 else kwargs.get("mode", "nearest")
            if mode in RESAMPLING_MODES:
                return separable_interpolate(*args, **kwargs)
        if differentiated and func is F.pad:
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            pad = args[1] if len(args) > 1 else kwargs["pad"]
            height, width = x.shape[-2:]
            plain = len(pad) == 4 and min(pad) >= 0 and max(pad[:2]) < width
            if mode == "reflect" and plain and max(pad[2:]) < height:
                return reflect_pad(x, pad)
        return func(*args, **kwargs)


@contextmanager
def deterministic_resampling() -> Iterator[None]:
    """Within the block, differentiated bilinear/bicubic ``F.interpolate`` and reflection
    ``F.pad`` on (N, C, H, W) tensors, including those inside libraries such as kornia, run
    as :func:`separable_interpolate` and :func:`reflect_pad`. Everything else is untouched."""
    with _DeterministicResampling():
        yield
