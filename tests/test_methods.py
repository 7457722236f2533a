"""Every method's one-step direction against its formula, computed independently.

The expected values use diffusers' own pieces (``latent_dist.sample``, ``DDPMScheduler.add_noise``,
the raw UNet and text encoder) and the full encoder Jacobian, never the package's helpers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from mimicshield.attack import project_linf, projected_sign_steps
from mimicshield.methods import METHODS, StepInputs

SEED = 7


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_model_dir):
    """One image, explicit t, n and posterior draw, and the raw components to recompute from."""
    model = tiny_model
    scheduler = DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    latent_shape = (1, *model.latent_shape(32, 32))
    posterior_noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(SEED))
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([421])
    tokens = model.tokenizer(
        "a photo", padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    cond = model.text_encoder(tokens)[0]
    sf = model.vae.config.scaling_factor

    def encode(image):
        """E(x) with diffusers' own posterior sampling, drawing the same normal as above."""
        dist = model.vae.encode(image).latent_dist
        return sf * dist.sample(generator=torch.Generator().manual_seed(SEED))

    def eps_hat(z):
        z_t = scheduler.add_noise(z, noise, t)
        return model.unet(z_t, t, encoder_hidden_states=cond).sample

    with torch.no_grad():
        target_latent = sf * model.vae.encode(y).latent_dist.mean
        source_latent = sf * model.vae.encode(x).latent_dist.mean
    inputs = StepInputs(
        t=t,
        noise=noise,
        cond=cond,
        posterior_noise=posterior_noise,
        target_latent=target_latent,
        source_latent=source_latent,
    )
    jacobian = torch.autograd.functional.jacobian(encode, x)  # (1, C, h, w, 1, 3, H, W)
    return dict(model=model, x=x, inputs=inputs, encode=encode, eps_hat=eps_hat, J=jacobian)


def vjp(J, v):
    """J^T v for the full encoder Jacobian."""
    return torch.tensordot(v, J, dims=v.ndim)


def autograd_of(loss_fn, x):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(loss_fn(x), x)[0]


def expected_direction(name: str, s) -> torch.Tensor:
    x, inputs, encode, eps_hat, J = s["x"], s["inputs"], s["encode"], s["eps_hat"], s["J"]
    n, zy, z0 = inputs.noise, inputs.target_latent, inputs.source_latent
    z = encode(x).detach()

    def semantic(xx):
        return F.mse_loss(eps_hat(encode(xx)), n)

    with torch.no_grad():
        residual = eps_hat(z) - n
    g_sds = vjp(J, residual)
    if name == "advdm+":
        return autograd_of(semantic, x)
    if name == "advdm-":
        return -autograd_of(semantic, x)
    if name == "photoguard":
        return -vjp(J, 2 * (z - zy))
    if name == "encoder":
        return vjp(J, 2 * (z - z0))
    if name == "mist":
        return -autograd_of(lambda xx: ((encode(xx) - zy) ** 2).sum() - 1e4 * semantic(xx), x)
    if name == "sds+":
        return g_sds
    if name == "sds-":
        return -g_sds
    if name == "sdst-":
        return -(5.0 * g_sds + vjp(J, 2 * (z - zy)))
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(METHODS))
def test_direction_matches_formula(setup, name):
    got = METHODS[name].direction(setup["model"], setup["x"], setup["inputs"])
    want = expected_direction(name, setup)
    assert got.shape == setup["x"].shape
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("name", ["sds-", "advdm+", "mist"])
def test_batched_direction_equals_per_image_direction(tiny_model, setup, name):
    """Losses are per image, so a batch of two gives each image its own gradient."""
    s = setup
    x2 = torch.cat([s["x"], s["x"].flip(-1)])
    i = s["inputs"]

    def twice(v):
        return None if v is None else torch.cat([v, v])

    batch_inputs = StepInputs(
        t=twice(i.t),
        noise=twice(i.noise),
        cond=twice(i.cond),
        posterior_noise=twice(i.posterior_noise),
        target_latent=twice(i.target_latent),
    )
    batched = METHODS[name].direction(tiny_model, x2, batch_inputs)
    single = METHODS[name].direction(tiny_model, s["x"], i)
    torch.testing.assert_close(
        batched[:1], single, rtol=1e-3, atol=1e-4 * single.abs().max().item()
    )


def test_projected_step_formula():
    """x <- clip(x0 + clip(x + alpha*sign(d) - x0, -eps, eps), -1, 1), written out by hand."""
    x0 = torch.tensor([[[[0.95, -0.99, 0.0, 0.5]]]])
    d = torch.tensor([[[[1.0, -2.0, 0.0, -0.1]]]])
    eps, alpha = 0.08, 0.03
    x = projected_sign_steps(x0, lambda x, i: d, eps=eps, step_size=alpha, steps=4)
    expected = x0.clone()
    for _ in range(4):
        expected = (x0 + (expected + alpha * torch.sign(d) - x0).clamp(-eps, eps)).clamp(-1, 1)
    torch.testing.assert_close(x, expected)
    assert torch.equal(project_linf(x0 + 1, x0, eps), (x0 + eps).clamp(-1, 1))


def test_missing_inputs_raise_a_clear_error(setup):
    inputs = StepInputs(t=setup["inputs"].t, noise=setup["inputs"].noise)
    with pytest.raises(ValueError, match="target_latent"):
        METHODS["photoguard"].direction(setup["model"], setup["x"], inputs)


def test_fp16_advdm_scales_its_loss_so_the_unet_backward_does_not_underflow(
    tiny_model_dir, monkeypatch
):
    """At 512 px dL_S/d(eps_hat) is ~1e-4, at the edge of fp16's range: without loss scaling
    the fp16 UNet backward rounds it away and ~2 % of the step's signs flip against fp32."""
    import mimicshield.methods as methods
    from mimicshield.models import load_models

    size = 512
    full = load_models(str(tiny_model_dir), device="cpu", dtype="fp32")
    half = load_models(str(tiny_model_dir), device="cpu", dtype="fp16")
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
    shape = (1, *full.latent_shape(size, size))
    noise, posterior = (
        torch.randn(shape, generator=generator),
        torch.randn(shape, generator=generator),
    )

    def direction(model):
        cond = model.condition("a photo", 1, size, size)
        inputs = StepInputs(
            t=torch.tensor([500]), noise=noise, cond=cond, posterior_noise=posterior
        )
        return METHODS["advdm+"].direction(model, x, inputs)

    def agreement(d):
        return float((d.sign() == reference.sign()).float().mean())

    reference = direction(full)
    scaled = agreement(direction(half))
    monkeypatch.setattr(methods, "FP16_LOSS_SCALE", 1.0)
    unscaled = agreement(direction(half))
    assert methods.loss_scale(full) == 1.0  # fp32 and bf16 are left as they are
    assert scaled > 0.995 and scaled > unscaled
