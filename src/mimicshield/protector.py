"""``Protector``: construct with parameters, call on images (torchattacks' convention)."""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .attack import projected_sign_steps, quantize_within_budget
from .cudagraphs import GraphedDirection, can_use_cuda_graphs
from .defaults import DEFAULT_METHOD
from .ensemble import members, weighted_direction
from .images import from_pil, to_pil
from .methods import SDST_DEFAULT_R, StepInputs, get_method
from .metrics import linf_255
from .reproducibility import deterministic_algorithms
from .robust import EOT, parse_robust
from .targets import target_pattern

if TYPE_CHECKING:
    from PIL import Image

    from .ensemble import Ensemble
    from .models import LatentDiffusion

DEFAULT_PROMPT = "a photo"
# torch's generators take seeds below 2**64; tiles and EOT add small offsets to the seed
MAX_SEED = 2**63 - 1
CATEGORY_PROMPTS = {
    "portrait": "a portrait photo",
    "anime": "an anime picture",
    "artwork": "an artwork painting",
    "landscape": "a landscape photo",
}


@dataclass(frozen=True)
class ProtectionConfig:
    """Everything that defines the maths of a run; serialised into the manifest.

    ``eps`` and ``step_size`` are on the [0, 1] pixel scale (16/255 means 16 grey levels).
    ``random_start`` None takes the method's own choice. ``quantize_levels`` rounds the result
    to that many levels within ``eps`` (255: what an 8-bit file can hold); None leaves it
    unrounded. ``robust`` names the transforms of :mod:`mimicshield.robust` to optimise over
    (EOT). ``posterior`` is how E(x) of the image being optimised is taken, a fresh sample each
    step or the mean; the fixed latents, E(y) of a target and the encoder attack's E(x0), are
    always the posterior mean (the reference re-samples them each step; the mean is the point
    its samples scatter around, computed once).
    """

    method: str = DEFAULT_METHOD
    eps: float = 16 / 255
    step_size: float = 1 / 255
    steps: int = 100
    prompt: str = DEFAULT_PROMPT
    random_start: bool | None = None
    posterior: Literal["sample", "mean"] = "sample"
    r: float = SDST_DEFAULT_R
    seed: int = 0
    quantize_levels: int | None = 255
    robust: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        get_method(self.method)
        object.__setattr__(self, "robust", parse_robust(self.robust))
        if not 0 < self.eps <= 1:
            raise ValueError(f"`eps` must be in (0, 1] on the [0, 1] pixel scale; got {self.eps}.")
        if not 0 < self.step_size <= 1:
            raise ValueError(f"`step_size` must be in (0, 1]; got {self.step_size}.")
        if not _whole(self.steps) or self.steps < 0:
            raise ValueError(f"`steps` must be a whole number >= 0; got {self.steps!r}.")
        if self.quantize_levels is not None and (
            not _whole(self.quantize_levels) or self.quantize_levels < 1
        ):
            raise ValueError(
                f"`quantize_levels` must be None or a whole number >= 1 (255 for 8-bit files); "
                f"got {self.quantize_levels!r}."
            )
        check_seed(self.seed, "seed")
        if not isinstance(self.prompt, str):
            raise TypeError(f"`prompt` must be a str; got {type(self.prompt).__name__}.")
        if self.posterior not in ("sample", "mean"):
            raise ValueError(f"`posterior` must be 'sample' or 'mean'; got {self.posterior!r}.")

    @property
    def uses_random_start(self) -> bool:
        if self.random_start is None:
            return get_method(self.method).random_start
        return self.random_start

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProtectionOutput:
    """Protected images in [0, 1] and the per-image L-infinity distance in 1/255 units."""

    images: Tensor
    linf_255: Tensor = field(default_factory=lambda: torch.empty(0))


class Protector:
    """Protect images against diffusion mimicry (Xue et al., ICLR 2024, arXiv 2311.12832).

    Distance measure: L-infinity.

    Arguments:
        model: a :class:`~mimicshield.models.LatentDiffusion` (or any object with ``encode``,
            ``predict_noise``, ``alphas_cumprod``, ``num_train_timesteps``, ``condition``,
            ``latent_shape`` and ``device``), or an
            :class:`~mimicshield.ensemble.Ensemble` of them: each step then follows the
            weighted sum of the models' directions, each with its own draws and conditioning.
        method: one of :data:`mimicshield.methods.METHODS`. (Default: ``"sds-"``)
        target: the target image for photoguard, mist and sdst-: a (3, H, W) tensor in [0, 1]
            or a PIL image, resized to each input; None uses the built-in pattern.
        cuda_graphs: on a CUDA device, record the step once as a CUDA graph and replay it
            (:mod:`mimicshield.cudagraphs`): for small batches, where kernel launches dominate.
            Not used with ensembles or ``robust``. How fast, not what: not part of the config.
        deterministic: run under PyTorch's deterministic mode
            (:mod:`mimicshield.reproducibility`), so the same seed, images and device give the
            same bytes on CUDA too (not applied on MPS). False lets CUDA use its faster
            non-deterministic kernels. The mode is torch's, for the whole process: it is on
            during each ``protect`` call, for other threads as well, and restored after.
        **config: the fields of :class:`ProtectionConfig` (eps, step_size, steps, prompt, ...).

    A grey image (three equal channels) gets one perturbation for all three channels, so it
    stays grey: each step follows the sign of the channel gradients' sum.

    Shape:
        images: (N, 3, H, W) in [0, 1], or PIL images; the output has the same type and size
        (tensors on the CPU in the input's floating dtype, rounded as ``quantize_levels`` says;
        PIL images as 8-bit RGB).

    Examples::
        >>> protector = Protector(model, method="sds-", eps=16/255, steps=100)
        >>> protected = protector(images)
    """

    def __init__(
        self,
        model: LatentDiffusion | Ensemble,
        method: str = DEFAULT_METHOD,
        *,
        target: Tensor | Image.Image | None = None,
        cuda_graphs: bool = False,
        deterministic: bool = True,
        **config: Any,
    ) -> None:
        self._latent_cache: dict[tuple[int, int, int], Tensor] = {}
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.deterministic = deterministic
        self.config = ProtectionConfig(method=method, **config)
        self.target = target
        if target is not None and not self.method.needs_target:
            warnings.warn(
                f"Method {self.config.method!r} does not use a target; `target` is ignored.",
                UserWarning,
                stacklevel=2,
            )
        # steps of the last protect() replayed from a CUDA graph (0: none, or graphs off)
        self.graph_replays = 0

    @property
    def model(self) -> LatentDiffusion | Ensemble:
        return self._model

    @model.setter
    def model(self, model: LatentDiffusion | Ensemble) -> None:
        # cached target latents are E(y) of this model: a new model needs new ones
        _check_model(model)
        self._model = model
        self._latent_cache.clear()

    @property
    def target(self) -> Tensor | None:
        return self._target

    @target.setter
    def target(self, target: Tensor | Image.Image | None) -> None:
        self._target = _as_tensor01(target) if target is not None else None
        self._latent_cache.clear()

    @property
    def method(self):
        """The :class:`~mimicshield.methods.Method` of ``config.method`` (read, never copied:
        a replaced ``config`` changes it too)."""
        return get_method(self.config.method)

    def __repr__(self) -> str:
        model = getattr(self.model, "name", None) or type(self.model).__name__
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())
        target = "None" if self.target is None else f"<image {tuple(self.target.shape)}>"
        return (
            f"Protector(model={model!r}, {fields}, target={target}, "
            f"cuda_graphs={self.cuda_graphs}, deterministic={self.deterministic})"
        )

    def __call__(
        self,
        images: Tensor | Image.Image | Sequence[Tensor | Image.Image],
        *,
        seeds: Sequence[int] | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> Tensor | Image.Image | list[Tensor | Image.Image]:
        """Protect ``images``; returns the same type that came in: an (N, 3, H, W) tensor, a
        PIL image, or a list of either (each protected at its own size, one at a time)."""
        if isinstance(images, Tensor):
            return self.protect(images, seeds=seeds, callback=callback).images
        from PIL import Image

        if isinstance(images, str | os.PathLike):
            raise TypeError(
                "`images` must be a tensor or PIL image(s); to protect files use "
                "mimicshield.runner.protect_files, or load them with mimicshield.images.load_image."
            )
        single = isinstance(images, Image.Image)
        items = [images] if single else list(images)
        if seeds is not None and len(seeds) != len(items):
            raise ValueError(f"`seeds` has {len(seeds)} seeds for {len(items)} images.")
        results = []
        for i, item in enumerate(items):
            seed = None if seeds is None else [seeds[i]]
            if isinstance(item, Image.Image):
                if "A" in item.getbands() or "transparency" in item.info:
                    warnings.warn(
                        "Protector drops the alpha channel of PIL images (the result is RGB); "
                        "mimicshield.runner.protect_files keeps it.",
                        stacklevel=2,
                    )
                protected = self.protect(from_pil(item)[None], seeds=seed, callback=callback)
                results.append(to_pil(protected.images[0]))
            else:
                if not isinstance(item, Tensor):
                    raise TypeError(
                        f"`images` item {i} must be a tensor or PIL image; got "
                        f"{type(item).__name__} (files: mimicshield.runner.protect_files)."
                    )
                if item.ndim == 4 and len(item) != 1:
                    raise ValueError(
                        "A list holds single images, (3, H, W) or (1, 3, H, W); pass a batch "
                        f"as one tensor (item {i} is {tuple(item.shape)})."
                    )
                batch = item if item.ndim == 4 else item[None]
                out = self.protect(batch, seeds=seed, callback=callback).images
                results.append(out if item.ndim == 4 else out[0])
        return results[0] if single else results

    def protect(
        self,
        images: Tensor,
        *,
        seeds: Sequence[int] | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> ProtectionOutput:
        """Protect a batch of same-size images in [0, 1].

        Args:
            images: (N, 3, H, W) in [0, 1].
            seeds: one seed per image (default: the config's seed for all). Each image draws
                from its own generator, so its random draws do not depend on the batch around it.
            callback: ``callback(step, total_steps)`` after every step, for progress bars.
        """
        _check_images(images)
        if seeds is not None:
            if len(seeds) != len(images):
                raise ValueError(f"`seeds` has {len(seeds)} seeds for a batch of {len(images)}.")
            for seed in seeds:
                check_seed(seed, "seeds")
        # an optimiser: it needs gradients even when called from no_grad / inference_mode code
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            deterministic_algorithms(self.deterministic, device=self.model.device),
        ):
            if images.is_inference():  # inference tensors cannot take part in autograd
                images = images.clone()
            return self._protect(images, seeds, callback)

    def _protect(self, images: Tensor, seeds, callback) -> ProtectionOutput:
        cfg = self.config
        device = self.model.device
        batch, _, height, width = images.shape
        seeds = [cfg.seed] * batch if seeds is None else list(seeds)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

        x0 = images.to(device=device, dtype=torch.float32) * 2 - 1
        models = members(self.model)  # [(model, weight)]; one model has weight 1
        latent_shapes = [model.latent_shape(height, width) for model, _ in models]
        eps, alpha = 2 * cfg.eps, 2 * cfg.step_size  # [0, 1] scale -> [-1, 1] scale
        fixed = [self._fixed_inputs(k, model, x0) for k, (model, _) in enumerate(models)]
        direction_fn = self.method.direction
        if cfg.method == "sdst-":
            direction_fn = partial(direction_fn, r=cfg.r)
        if self.cuda_graphs and can_use_cuda_graphs(
            device, ensemble=len(models) > 1, robust=bool(cfg.robust)
        ):
            direction_fn = GraphedDirection(direction_fn)

        # A grey image (three equal channels) gets one perturbation for all three: its step
        # follows the sum of the channel gradients (the gradient with respect to the grey value)
        # and it stays grey, instead of three independent ones averaged into a weaker one.
        grey = (x0[:, :1] == x0).flatten(1).all(1).view(-1, 1, 1, 1)
        any_grey = bool(grey.any())  # once: on CUDA every bool() of a tensor waits for the GPU

        def one_for_grey(t: Tensor, reduce) -> Tensor:
            return torch.where(grey, reduce(t).expand_as(t), t) if any_grey else t

        start = None
        if cfg.uses_random_start:
            start = _stack(lambda g: torch.rand(x0.shape[1:], generator=g) * 2 - 1, generators)
            start = one_for_grey(start.to(device) * eps, lambda t: t[:, :1])

        eot = EOT(cfg.robust, seeds) if cfg.robust else None
        draws = self._draws_ahead(models, generators, latent_shapes)

        def direction(x: Tensor, step: int) -> Tensor:
            terms = []
            drawn = next(draws)  # this step's, one dict per model
            for (model, weight), fixed_k, drawn_k in zip(models, fixed, drawn, strict=True):
                inputs = StepInputs(**drawn_k, **fixed_k)
                if eot is not None:
                    model = eot.wrap(model, x.shape[1:])
                    if inputs.source_latent is not None:
                        # the encoder attack measures E(T(x)) against E(T(x0)), same T
                        with torch.no_grad():
                            inputs = replace(inputs, source_latent=model.encode(x0))
                terms.append((model, weight, inputs))
            summed = partial(torch.sum, dim=1, keepdim=True)
            return one_for_grey(weighted_direction(direction_fn, terms, x), summed)

        def on_step(step: int, _x: Tensor) -> None:
            if callback is not None:
                callback(step + 1, cfg.steps)

        x_adv = projected_sign_steps(
            x0, direction, eps=eps, step_size=alpha, steps=cfg.steps, start=start, callback=on_step
        )
        self.graph_replays = getattr(direction_fn, "replays", 0)
        protected = ((x_adv + 1) / 2).cpu()
        clean = images.detach().to(device="cpu", dtype=torch.float32)
        if cfg.quantize_levels:
            protected = quantize_within_budget(protected, clean, cfg.eps, cfg.quantize_levels)
        distance = linf_255(protected, clean)
        # the caller's floating dtype back (the maths runs in float32)
        return ProtectionOutput(images=protected.to(images.dtype), linf_255=distance)

    # --- helpers ----------------------------------------------------------------------------

    def _fixed_inputs(self, index: int, model, x0: Tensor) -> dict:
        """The inputs that stay fixed over the run: computed once, not every step.

        ``model`` is member ``index`` of the ensemble (0 for a single model).
        """
        batch, _, height, width = x0.shape
        fixed: dict = {}
        if self.method.needs_unet:
            fixed["cond"] = model.condition(self.config.prompt, batch, height, width)
        with torch.no_grad():
            if self.method.needs_target:
                target = self._target_latent(index, model, height, width)
                fixed["target_latent"] = target.expand(batch, -1, -1, -1)
            if self.config.method == "encoder":
                fixed["source_latent"] = model.encode(x0)
        return fixed

    def _target_latent(self, index: int, model, height: int, width: int) -> Tensor:
        """E(y) (the posterior mean) for the target resized to this size, cached per size."""
        key = (index, height, width)
        size = (height, width)
        if key not in self._latent_cache:
            if self.target is None:
                target = target_pattern(height, width)[None]
            else:
                target = F.interpolate(
                    self.target[None],
                    size=size,
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                ).clamp(0, 1)
            self._latent_cache[key] = model.encode(target.to(model.device) * 2 - 1)
        return self._latent_cache[key]

    def _draw_random_inputs(self, model, generators, latent_shape) -> dict:
        """One timestep and noise (semantic methods) and one posterior draw per image, on
        the CPU.

        Drawn from each image's own generator, so results do not depend on the batch an
        image is in, and the random streams are the same on every device. An ensemble's
        models draw in turn from the same generators: each gets its own t and n.
        """
        drawn: dict = {}
        if self.method.needs_unet:
            steps = model.num_train_timesteps
            drawn["t"] = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators])
            drawn["noise"] = _stack(lambda g: torch.randn(latent_shape, generator=g), generators)
        if self.config.posterior == "sample":
            posterior = _stack(lambda g: torch.randn(latent_shape, generator=g), generators)
            drawn["posterior_noise"] = posterior
        return drawn

    def _draws_ahead(self, models, generators, latent_shapes) -> Iterator[list[dict]]:
        """Each step's random inputs (a dict per model, on its device), drawn in the order of
        :meth:`_draw_random_inputs` step after step, but ``DRAW_AHEAD`` steps at a time.

        Why ahead: a plain copy of a CPU draw to a GPU waits for the GPU to finish all it was
        given, the previous step's backward pass included, three times a step, and the GPU
        then idles while the next step is launched. A block of steps goes over in one
        non-blocking copy from pinned memory per tensor instead. The values are the same.
        """
        steps = self.config.steps
        for first in range(0, steps, DRAW_AHEAD):
            block = [
                [
                    self._draw_random_inputs(model, generators, shape)
                    for (model, _), shape in zip(models, latent_shapes, strict=True)
                ]
                for _ in range(min(DRAW_AHEAD, steps - first))
            ]
            moved = [
                {
                    name: _to_device_at_once([step[k][name] for step in block], model.device)
                    for name in block[0][k]
                }
                for k, (model, _) in enumerate(models)
            ]
            for i in range(len(block)):
                yield [{name: values[i] for name, values in drawn.items()} for drawn in moved]


def _stack(draw: Callable[[torch.Generator], Tensor], generators) -> Tensor:
    return torch.stack([draw(g) for g in generators])


DRAW_AHEAD = 10  # steps of random inputs per copy to the device: 2.5 MiB per 512 px image


def _to_device_at_once(tensors: list[Tensor], device: torch.device) -> Tensor:
    """``tensors`` stacked and moved to ``device`` in one copy, without waiting for the GPU
    (pinned memory makes a CUDA copy asynchronous; PyTorch keeps the buffer until it is done)."""
    stacked = torch.stack(tensors)
    if device.type != "cuda":  # the CPU: nothing to copy; MPS: a plain copy
        return stacked.to(device)
    return stacked.pin_memory().to(device, non_blocking=True)


def _whole(value) -> bool:
    """An integer of any kind (numpy's too, as parameter sweeps make them), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_seed(value, name: str) -> None:
    """One rule for ``seed`` and ``seeds``: a whole number that torch's generators take."""
    if not _whole(value) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"`{name}` must be whole numbers between 0 and {MAX_SEED}; got {value!r}.")


def _check_model(model) -> None:
    """Refuse a path (load it first) and an inpainting UNet (it takes 9 input channels)."""
    if isinstance(model, str | os.PathLike):
        raise TypeError(
            "`model` must be a loaded model; load it with mimicshield.load_models(path)."
        )
    for member, _ in members(model):
        unet = getattr(member, "unet", None)
        vae = getattr(member, "vae", None)
        if unet is None or vae is None:
            continue
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"Protection needs the plain (text-to-image) model; this UNet takes "
                f"{unet.config.in_channels} input channels (an inpainting model?): load the "
                "base model with load_models(path) without inpainting=True."
            )


MIN_SIDE = 8  # pixels: the VAE downsamples by 8


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"`images` must be a tensor; got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`images` must have shape (N, 3, H, W); got {tuple(images.shape)}.")
    if len(images) == 0:  # torch's own error for an empty batch names no argument
        raise ValueError("`images` is an empty batch (N = 0): pass at least one image.")
    if min(images.shape[-2:]) < MIN_SIDE:
        raise ValueError(
            f"`images` must be at least {MIN_SIDE} pixels a side; got {tuple(images.shape[-2:])}."
        )
    if not images.is_floating_point():
        raise ValueError(f"`images` must be floats in [0, 1]; got {images.dtype} (divide by 255).")
    if not torch.isfinite(images).all():
        raise ValueError("`images` must be finite, in [0, 1]; got NaN or infinite pixels.")
    if images.min() < 0 or images.max() > 1:
        raise ValueError("`images` must be in [0, 1] (use PIL images or divide uint8 by 255).")


def _as_tensor01(image) -> Tensor:
    """A target image as (3, H, W) floats in [0, 1]: a tensor (uint8 is divided by 255, a
    batch of one unwrapped) or a PIL image."""
    if isinstance(image, str | os.PathLike):
        raise TypeError(
            "`target` must be a tensor or PIL image; load a file with "
            "mimicshield.images.load_image(path).rgb."
        )
    if not isinstance(image, Tensor):
        return from_pil(image)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"`target` must have shape (3, H, W); got {tuple(image.shape)}.")
    image = image.detach().cpu().clone()  # a copy of the caller's: no graph, no device to follow
    image = image.float() / 255 if not image.is_floating_point() else image.float()
    if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise ValueError("`target` must be in [0, 1] and finite (uint8 is divided by 255).")
    return image
