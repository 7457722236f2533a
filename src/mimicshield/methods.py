"""The protection methods of Xue et al. (ICLR 2024, arXiv 2311.12832) and its baselines.

Each method is a pure function ``direction(model, x, inputs) -> Tensor``: the direction ``d`` of
one projected-sign step, ``x <- x + alpha * sign(d)``. Ascent methods return a gradient,
descent methods its negative, so the sign convention is visible in every function body.

Notation (name here -> paper):
    x             the image being optimised, in [-1, 1]
    z = E(x)      ``model.encode(x, posterior_noise)``: scaling_factor * posterior sample
    t, noise      a timestep t ~ U{0..T-1} and n ~ N(0, I), one of each per image and step
    z_t           sqrt(abar_t) * E(x) + sqrt(1 - abar_t) * n
    eps_hat       eps_theta(z_t, t, c), the UNet's noise prediction
    L_S           mean((eps_hat - n)^2), the semantic loss (per image)
    L_T           sum((E(x) - E(y))^2), the textural loss towards a target image y (per image)

Losses are kept per image and summed over the batch, so a batch gives each image exactly the
gradient it would get alone (a batch-wide mean would rescale L_S against L_T in ``mist``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .models import Conditioning

MIST_SEMANTIC_WEIGHT = 1e4
SDST_DEFAULT_R = 5.0


@dataclass(frozen=True)
class StepInputs:
    """Everything random or fixed that one step needs besides ``x``, made explicit for tests.

    Attributes:
        t: timesteps, shape (B,), integers in [0, T); only the semantic methods use it.
        noise: n ~ N(0, I), shape of the latent (B, C, h, w); with ``t``.
        cond: text conditioning c, from ``model.condition``; only handed to
            ``model.predict_noise`` (SDXL's also carries a pooled embedding and time ids).
        posterior_noise: N(0, I) draw for the VAE posterior sample, or None for its mean.
        target_latent: E(y) for the textural loss (photoguard, mist, sdst-), or None.
        source_latent: E(x0) for the untargeted encoder attack, or None.
    """

    t: Tensor | None = None
    noise: Tensor | None = None
    cond: Tensor | Conditioning | None = None
    posterior_noise: Tensor | None = None
    target_latent: Tensor | None = None
    source_latent: Tensor | None = None


# --- pure maths -------------------------------------------------------------------------------


def add_noise(z: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """z_t = sqrt(abar_t) z + sqrt(1 - abar_t) n (DDPM forward process)."""
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * z + (1 - abar).sqrt() * noise


def eps_from_v_prediction(v_hat: Tensor, z_t: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """eps_hat = sqrt(abar_t) v_hat + sqrt(1 - abar_t) z_t, for v-prediction models (SD 2.x-v).

    With v = sqrt(abar) n - sqrt(1 - abar) z and z_t = sqrt(abar) z + sqrt(1 - abar) n, this
    recovers n exactly, so L_S and the SDS residual are computed on the same epsilon.
    """
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * v_hat + (1 - abar).sqrt() * z_t


def v_target(z: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """v = sqrt(abar_t) n - sqrt(1 - abar_t) z: what a v-prediction model learns to output.

    The training target of SD 2.x-v fine-tunes (textual inversion, LoRA), where an epsilon
    model's target is n itself.
    """
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * noise - (1 - abar).sqrt() * z


def semantic_loss(eps_hat: Tensor, noise: Tensor) -> Tensor:
    """L_S = mean((eps_hat - n)^2) per image, shape (B,)."""
    return (eps_hat - noise).pow(2).flatten(1).mean(1)


def textural_loss(z: Tensor, z_target: Tensor) -> Tensor:
    """L_T = sum((E(x) - E(y))^2) per image, shape (B,)."""
    return (z - z_target).pow(2).flatten(1).sum(1)


# L_S is a mean over every latent element, so at 512 px the gradient reaching the UNet's output
# is about 2|eps_hat - n| / 16384 ~ 1e-4, at the edge of fp16's normal range (6.1e-5), and
# smaller at larger sizes: an fp16 UNet backward then loses it to underflow. Scaling the loss
# (and the gradient back) keeps it representable, as mixed-precision training's loss scaling
# does; the step's sign and its value in fp32 are unchanged.
FP16_LOSS_SCALE = 2.0**12


def loss_scale(model) -> float:
    """The factor the UNet-backpropagating losses are scaled by: only for fp16 UNets."""
    return FP16_LOSS_SCALE if getattr(model, "dtype", None) == torch.float16 else 1.0


def _gradient(loss: Tensor, x: Tensor, scale: float = 1.0) -> Tensor:
    """d(sum of loss)/dx, computed on ``scale * loss`` and divided back (see FP16_LOSS_SCALE)."""
    gradient = torch.autograd.grad(loss.sum() * scale, x)[0]
    return gradient / scale if scale != 1.0 else gradient


def _require(value: Tensor | None, what: str, method: str) -> Tensor:
    if value is None:
        raise ValueError(f"`{method}` needs `{what}` in its StepInputs.")
    return value


def _semantic_loss_with_grad(model, x: Tensor, inputs: StepInputs) -> Tensor:
    """L_S with the graph through the UNet and the encoder (AdvDM and Mist)."""
    z = model.encode(x, inputs.posterior_noise)
    return _semantic_loss(model, z, inputs)


def _semantic_loss(model, z: Tensor, inputs: StepInputs) -> Tensor:
    """L_S at E(x) = z for the step's t and n."""
    t = _require(inputs.t, "t", "semantic loss")
    noise = _require(inputs.noise, "noise", "semantic loss")
    z_t = add_noise(z, t, noise, model.alphas_cumprod)
    eps_hat = model.predict_noise(z_t, t, _require(inputs.cond, "cond", "semantic loss"))
    return semantic_loss(eps_hat, noise)


def _encoder_vjp(model, x: Tensor, inputs: StepInputs, latent_direction) -> Tensor:
    """(dE/dx)^T v, with v = latent_direction(z) computed from a detached E(x)."""
    z = model.encode(x, inputs.posterior_noise)
    v = latent_direction(z.detach())
    return torch.autograd.grad(z, x, grad_outputs=v)[0]


def _sds_residual(model, z: Tensor, inputs: StepInputs) -> Tensor:
    """eps_hat - n, with the UNet run without gradients (score distillation)."""
    t = _require(inputs.t, "t", "sds")
    noise = _require(inputs.noise, "noise", "sds")
    with torch.no_grad():
        z_t = add_noise(z, t, noise, model.alphas_cumprod)
        eps_hat = model.predict_noise(z_t, t, _require(inputs.cond, "cond", "sds"))
    return eps_hat - noise


# --- step directions --------------------------------------------------------------------------


def advdm_plus(model, x: Tensor, inputs: StepInputs) -> Tensor:
    """AdvDM: ascend L_S, backpropagating through the UNet and the encoder."""
    x = x.detach().requires_grad_(True)
    return _gradient(_semantic_loss_with_grad(model, x, inputs), x, loss_scale(model))


def advdm_minus(model, x: Tensor, inputs: StepInputs) -> Tensor:
    """AdvDM(-): descend L_S (Xue et al. Sec. 4.2)."""
    x = x.detach().requires_grad_(True)
    return -_gradient(_semantic_loss_with_grad(model, x, inputs), x, loss_scale(model))


def photoguard(model, x: Tensor, inputs: StepInputs) -> Tensor:
    """PhotoGuard encoder attack: descend L_T towards the target's latent."""
    target = _require(inputs.target_latent, "target_latent", "photoguard")
    x = x.detach().requires_grad_(True)
    return -_gradient(textural_loss(model.encode(x, inputs.posterior_noise), target), x)


def encoder_attack(model, x: Tensor, inputs: StepInputs) -> Tensor:
    """Untargeted encoder attack: ascend sum((E(x) - E(x0))^2)."""
    source = _require(inputs.source_latent, "source_latent", "encoder")
    x = x.detach().requires_grad_(True)
    return _gradient(textural_loss(model.encode(x, inputs.posterior_noise), source), x)


def mist(model, x: Tensor, inputs: StepInputs) -> Tensor:
    """Mist: descend L_T - 1e4 * L_S, i.e. pull E(x) to the target while raising L_S."""
    target = _require(inputs.target_latent, "target_latent", "mist")
    x = x.detach().requires_grad_(True)
    z = model.encode(x, inputs.posterior_noise)
    loss = textural_loss(z, target) - MIST_SEMANTIC_WEIGHT * _semantic_loss(model, z, inputs)
    return -_gradient(loss, x)


def sds_gradient(model, x: Tensor, inputs: StepInputs) -> Tensor:
    """g = (dE/dx)^T (eps_hat - n): the SDS gradient of L_S, skipping the UNet Jacobian."""
    x = x.detach().requires_grad_(True)
    return _encoder_vjp(model, x, inputs, lambda z: _sds_residual(model, z, inputs))


def sds_plus(model, x: Tensor, inputs: StepInputs) -> Tensor:
    """SDS(+): x <- x + alpha * sign(g) (Xue et al. Eq. 5)."""
    return sds_gradient(model, x, inputs)


def sds_minus(model, x: Tensor, inputs: StepInputs) -> Tensor:
    """SDS(-): x <- x - alpha * sign(g), the paper's recommended method."""
    return -sds_gradient(model, x, inputs)


def sdst_minus(model, x: Tensor, inputs: StepInputs, *, r: float = SDST_DEFAULT_R) -> Tensor:
    """SDST(-): x <- x - alpha * sign(r * g + grad_x L_T), one shared encoder backward pass.

    grad_x L_T = (dE/dx)^T 2 (E(x) - E(y)), so both terms are one vector-Jacobian product.
    """
    target = _require(inputs.target_latent, "target_latent", "sdst-")
    x = x.detach().requires_grad_(True)

    def latent_direction(z: Tensor) -> Tensor:
        return r * _sds_residual(model, z, inputs) + 2 * (z - target)

    return -_encoder_vjp(model, x, inputs, latent_direction)


# --- registry ---------------------------------------------------------------------------------

Direction = Callable[..., Tensor]


@dataclass(frozen=True)
class Method:
    """A protection method: its step direction and the defaults the paper uses with it."""

    name: str
    direction: Direction
    summary: str
    random_start: bool
    needs_target: bool = False
    needs_unet: bool = True
    # the gradient flows back through the UNet (AdvDM, Mist); SDS runs it without gradients
    backprops_unet: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "advdm+",
            advdm_plus,
            "ascend L_S through UNet and encoder (AdvDM)",
            random_start=True,
            backprops_unet=True,
        ),
        Method(
            "advdm-",
            advdm_minus,
            "descend L_S through UNet and encoder",
            random_start=True,
            backprops_unet=True,
        ),
        Method(
            "photoguard",
            photoguard,
            "descend L_T: pull E(x) to a target",
            random_start=True,
            needs_target=True,
            needs_unet=False,
        ),
        Method(
            "encoder",
            encoder_attack,
            "ascend ||E(x)-E(x0)||^2 (untargeted)",
            random_start=True,
            needs_unet=False,
        ),
        Method(
            "mist",
            mist,
            "descend L_T - 1e4 L_S (Mist)",
            random_start=True,
            needs_target=True,
            backprops_unet=True,
        ),
        Method("sds+", sds_plus, "SDS gradient ascent, no UNet backward", random_start=False),
        Method(
            "sds-",
            sds_minus,
            "SDS gradient descent, no UNet backward (recommended)",
            random_start=False,
        ),
        Method(
            "sdst-",
            sdst_minus,
            "SDS(-) plus the textural loss, r=5",
            random_start=False,
            needs_target=True,
        ),
    ]
}


def get_method(name: str) -> Method:
    """Look a method up by name, with an error that lists the valid names."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of: {', '.join(METHODS)}.")
    return METHODS[name]
