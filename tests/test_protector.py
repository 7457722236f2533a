"""The optimisation loop and the Protector: signs, budgets, determinism and batching."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from mimicshield.attack import projected_sign_steps, quantize_within_budget
from mimicshield.methods import METHODS, StepInputs, add_noise, semantic_loss, textural_loss
from mimicshield.protector import ProtectionConfig, Protector
from mimicshield.targets import target_pattern

EPS, ALPHA = 32 / 255, 2 / 255  # the paper's 16/255 and 1/255, in [-1, 1] units


@pytest.fixture(scope="module")
def fixed(tiny_model):
    """Two images with fixed t and n, so every method's objective is deterministic."""
    model = tiny_model
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (2, 3, 32, 32), generator=generator).float() / 255 * 2 - 1
    t = torch.tensor([300, 700])
    noise = torch.randn((2, *model.latent_shape(32, 32)), generator=generator)
    cond = model.embed_prompt("a photo").expand(2, -1, -1)
    with torch.no_grad():
        target = model.encode(target_pattern(32, 32)[None] * 2 - 1).expand(2, -1, -1, -1)
        source = model.encode(x0)
        residual0 = model.predict_noise(add_noise(source, t, noise, model.alphas_cumprod), t, cond)
    inputs = StepInputs(t=t, noise=noise, cond=cond, target_latent=target, source_latent=source)
    return dict(x0=x0, inputs=inputs, residual0=residual0 - noise)


def objective(name: str, model, x: torch.Tensor, f) -> torch.Tensor:
    """The quantity each method should move, and the sign it should move it in (+1 = raise).

    For the SDS methods the UNet Jacobian is skipped, so with random weights L_S itself need not
    move; what the step provably moves is the surrogate <eps_hat(x0) - n, E(x)>.
    """
    i = f["inputs"]
    with torch.no_grad():
        z = model.encode(x)
        eps_hat = model.predict_noise(add_noise(z, i.t, i.noise, model.alphas_cumprod), i.t, i.cond)
        l_s = semantic_loss(eps_hat, i.noise)
        l_t = textural_loss(z, i.target_latent)
        sds = (f["residual0"] * z).flatten(1).sum(1)
    return {
        "advdm+": l_s,
        "advdm-": -l_s,
        "photoguard": -l_t,
        "encoder": textural_loss(z, i.source_latent),
        "mist": -(l_t - 1e4 * l_s),
        "sds+": sds,
        "sds-": -sds,
        "sdst-": -(5 * sds + l_t),
    }[name]


@pytest.mark.parametrize("name", list(METHODS))
def test_twenty_steps_move_the_objective_the_intended_way(tiny_model, fixed, name):
    method = METHODS[name]
    start = None
    if method.random_start:
        start = torch.rand(fixed["x0"].shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
        start = start * EPS
    x = projected_sign_steps(
        fixed["x0"],
        lambda x, i: method.direction(tiny_model, x, fixed["inputs"]),
        eps=EPS,
        step_size=ALPHA,
        steps=20,
        start=start,
    )
    before = objective(name, tiny_model, fixed["x0"], fixed)
    after = objective(name, tiny_model, x, fixed)
    assert torch.all(after > before), (name, before, after)
    assert (x - fixed["x0"]).abs().max() <= EPS + 1e-6


@pytest.mark.parametrize("name", list(METHODS))
def test_saved_file_respects_budget_and_size(tiny_model, tmp_path, images_8bit, name):
    protector = Protector(tiny_model, name, eps=8 / 255, steps=3)
    result = protector(images_8bit)
    for i, image in enumerate(result):
        path = tmp_path / f"{i}.png"
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
        saved = np.asarray(Image.open(path)).astype(int)
        clean = (images_8bit[i] * 255).round().int().permute(1, 2, 0).numpy()
        assert saved.shape == clean.shape
        assert np.abs(saved - clean).max() <= 8


def test_seeded_runs_are_identical_and_seeds_matter(tiny_model, images_8bit):
    first = Protector(tiny_model, "sds-", steps=3, seed=5)(images_8bit)
    again = Protector(tiny_model, "sds-", steps=3, seed=5)(images_8bit)
    other = Protector(tiny_model, "sds-", steps=3, seed=6)(images_8bit)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_batch_gives_each_image_its_single_result(tiny_model, images_8bit):
    protector = Protector(tiny_model, "photoguard", steps=3, seed=3)
    together = protector(images_8bit)
    alone = torch.cat([protector(images_8bit[i : i + 1]) for i in range(2)])
    assert torch.equal(together, alone)


def test_pil_in_pil_out(tiny_model, images_8bit):
    array = (images_8bit[0] * 255).byte().permute(1, 2, 0).numpy()
    out = Protector(tiny_model, "sds-", steps=2)(Image.fromarray(array))
    assert isinstance(out, Image.Image) and out.size == (32, 32)
    assert np.abs(np.asarray(out).astype(int) - array.astype(int)).max() <= 16


def test_the_api_checks_what_it_is_given(tiny_model, images_8bit):
    """Seeds, targets and inputs that would run wrongly are refused with a clear message."""
    protector = Protector(tiny_model, "photoguard", steps=1)
    with pytest.raises(ValueError, match="1 seeds for a batch of 2"):
        protector.protect(images_8bit, seeds=[1])  # both images would share one draw
    with pytest.raises(ValueError, match="at least 8 pixels"):
        protector(torch.rand(1, 3, 4, 32))
    with pytest.raises(ValueError, match="empty batch"):
        protector(torch.rand(0, 3, 32, 32))
    with pytest.raises(ValueError, match="divide by 255"):
        protector((images_8bit * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="whole number"):
        Protector(tiny_model, steps=2.5)
    with pytest.raises(ValueError, match="quantize_levels"):
        Protector(tiny_model, quantize_levels=0)
    with pytest.raises(ValueError, match=r"`target` must be in \[0, 1\]"):
        Protector(tiny_model, "photoguard", target=torch.full((3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="single images"):
        protector([images_8bit])  # a batch inside a list: one seed could not serve it
    assert Protector(tiny_model, steps=np.int64(3)).config.steps == 3  # numpy's ints are whole
    # the target is the protector's own copy: no graph, on the CPU
    graph = torch.rand(3, 8, 8, requires_grad=True)
    assert not Protector(tiny_model, "photoguard", target=graph).target.requires_grad
    # a uint8 target is read as 8-bit levels, and a batch of one is unwrapped
    target = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    given = Protector(tiny_model, "photoguard", target=target).target
    torch.testing.assert_close(given, target[0].float() / 255)


def test_lists_of_images_come_back_as_lists_each_with_its_own_seed(tiny_model, images_8bit):
    protector = Protector(tiny_model, "photoguard", steps=2)
    one, two = protector([images_8bit[0], images_8bit[1]], seeds=[3, 4])
    assert one.shape == (3, 32, 32)
    assert torch.equal(one, protector.protect(images_8bit[:1], seeds=[3]).images[0])
    assert torch.equal(two, protector.protect(images_8bit[1:], seeds=[4]).images[0])
    pil = Image.fromarray((images_8bit[0] * 255).byte().permute(1, 2, 0).numpy()).convert("RGBA")
    with pytest.warns(UserWarning, match="alpha"):
        (out,) = protector([pil], seeds=[3])
    assert out.mode == "RGB"
    with pytest.raises(ValueError, match="2 seeds for 1 images"):
        protector([pil], seeds=[3, 4])


def test_quantize_never_exceeds_budget():
    """Rounding alone can land half a level outside eps; re-projection keeps it inside."""
    x0 = torch.tensor([100.0, 100.0, 0.0, 255.0]) / 255
    x = x0 + torch.tensor([16.49, -16.6, -3.0, 2.0]) / 255
    q = quantize_within_budget(x, x0, 16 / 255) * 255
    torch.testing.assert_close(q, torch.tensor([116.0, 84.0, 0.0, 255.0]))
    assert torch.equal(q, q.round())


@pytest.mark.parametrize("levels", [255, 65535])
def test_quantize_keeps_images_between_levels_within_budget(levels):
    """A resized or generated image is not on the file's levels: the budget is around x0 itself."""
    generator = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 16, 16, generator=generator)
    x = (x0 + (torch.rand(x0.shape, generator=generator) * 2 - 1) * 20 / 255).clamp(0, 1)
    q = quantize_within_budget(x, x0, 16 / 255, levels).double() * levels
    assert ((q - q.round()).abs() < 1e-2).all()  # on the levels (float32 of a 16-bit level)
    assert ((q - x0.double() * levels).abs() <= 16 / 255 * levels + 1e-2).all()
    # the levels nearest the budget's edge are still reachable: nothing is given away
    pushed = quantize_within_budget((x0 + 1).clamp(max=1), x0, 16 / 255, levels).double()
    edge = (x0.double() * levels + 16 / 255 * levels).clamp(max=levels)
    assert (pushed * levels > edge - 1 - 1e-2).all()  # less than one level short of it


def test_quantize_in_chunks_is_the_whole_image_at_once(monkeypatch):
    """Pixel by pixel, so chunks (here of 7 values, the last one short) change no value: a
    50-megapixel photo no longer needs whole-image float64 copies."""
    import mimicshield.attack as attack_module

    generator = torch.Generator().manual_seed(5)
    x0 = torch.rand(1, 3, 9, 11, generator=generator)
    x = (x0 + (torch.rand(x0.shape, generator=generator) * 2 - 1) * 20 / 255).clamp(0, 1)
    whole = quantize_within_budget(x, x0, 16 / 255)
    monkeypatch.setattr(attack_module, "QUANTIZE_CHUNK", 7)
    chunked = quantize_within_budget(x, x0, 16 / 255)
    assert chunked.shape == x.shape and chunked.dtype == x.dtype
    assert torch.equal(chunked, whole)
    # each value's own: computed here directly, the function's formula on one value at a time
    levels = 255
    for index in [(0, 0, 0, 0), (0, 2, 8, 10), (0, 1, 4, 5)]:
        lo = math.ceil(x0[index].item() * levels - 16)
        hi = math.floor(x0[index].item() * levels + 16)
        want = min(max(round(x[index].item() * levels), max(lo, 0)), min(hi, levels)) / levels
        assert chunked[index].item() == pytest.approx(want, abs=1e-7)


def test_protector_output_stays_within_eps_of_an_image_between_levels(tiny_model):
    x0 = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    out = Protector(tiny_model, "sds-", steps=20, eps=4 / 255, step_size=1 / 255).protect(x0)
    assert (out.images - x0).abs().max() * 255 <= 4 + 1e-4
    assert out.linf_255.max() > 3  # the steps reach the budget


def test_config_validation_and_repr(tiny_model):
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        ProtectionConfig(method="nope")
    with pytest.raises(ValueError, match="eps"):
        ProtectionConfig(eps=16)
    text = repr(Protector(tiny_model, "sdst-", r=3.0))
    assert "method='sdst-'" in text and "r=3.0" in text and "steps=100" in text
    assert f"model={tiny_model.name!r}" in text and "deterministic=True" in text
    protector = Protector(tiny_model, "sds-")
    protector.config = replace(protector.config, method="photoguard")
    assert protector.method.name == "photoguard"  # read from the config, never a stale copy
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Protector(tiny_model)(torch.full((1, 3, 32, 32), 2.0))


def paper_loop(model, images, method, seeds, eps_255, alpha_255, steps, prompt="a photo", r=5.0):
    """The protection of issue 2 written out by hand: [-1, 1] units, a random start for
    photoguard and advdm+, per step t ~ U{0..999}, n and the posterior draw from each image's
    generator, the step x <- clip(x0 + clip(x -/+ alpha sign(g) - x0, -eps, eps), -1, 1) (+ for
    the ascending advdm+), the 8-bit file."""
    eps, alpha = 2 * eps_255 / 255, 2 * alpha_255 / 255
    height, width = images.shape[-2:]
    latent = model.latent_shape(height, width)
    x0 = images * 2 - 1
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    x = x0.clone()
    grey = bool((x0[:, :1] == x0).all())  # then one perturbation for the three channels
    if method in ("photoguard", "advdm+"):
        start = torch.stack([torch.rand(x0.shape[1:], generator=g) * 2 - 1 for g in generators])
        start = start[:, :1].expand_as(start) if grey else start
        x = (x0 + eps * start).clamp(-1, 1)
    with torch.no_grad():
        target = model.encode(target_pattern(height, width)[None] * 2 - 1)
    cond = model.embed_prompt(prompt).expand(len(seeds), -1, -1)
    abar = model.alphas_cumprod
    for _ in range(steps):
        if method != "photoguard":
            t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in generators])
            n = torch.stack([torch.randn(latent, generator=g) for g in generators])
            a = abar[t].view(-1, 1, 1, 1)
        posterior = torch.stack([torch.randn(latent, generator=g) for g in generators])
        x = x.detach().requires_grad_(True)
        z = model.encode(x, posterior)
        if method in ("sds-", "sdst-"):  # g = J^T (r (eps_hat(z_t) - n) + 2 (z - z_y)) for sdst-
            with torch.no_grad():
                residual = model.predict_noise(a.sqrt() * z + (1 - a).sqrt() * n, t, cond) - n
                v = residual if method == "sds-" else r * residual + 2 * (z - target)
            g = torch.autograd.grad((z * v).sum(), x)[0]  # no UNet backward
        elif method == "advdm+":  # ascend L_S = mean((eps_hat - n)^2) through UNet and encoder
            eps_hat = model.predict_noise(a.sqrt() * z + (1 - a).sqrt() * n, t, cond)
            g = -torch.autograd.grad(((eps_hat - n) ** 2).flatten(1).mean(1).sum(), x)[0]
        else:  # photoguard: g = grad ||E(x) - E(y)||^2
            g = torch.autograd.grad(((z - target) ** 2).sum(), x)[0]
        if grey:  # the gradient with respect to the grey value: the sum over channels
            g = g.sum(1, keepdim=True).expand_as(g)
        x = (x0 + (x.detach() - alpha * g.sign() - x0).clamp(-eps, eps)).clamp(-1, 1)
    levels = torch.round((x + 1) / 2 * 255)
    clean = torch.round(images * 255)
    return torch.minimum(torch.maximum(levels, clean - eps_255), clean + eps_255) / 255


@pytest.mark.parametrize("method", ["sds-", "photoguard", "sdst-", "advdm+"])
def test_the_protector_is_the_papers_loop_written_out(tiny_model, images_8bit, method):
    """Pins the Protector's own wiring (units, random start, draws, projection, rounding, r),
    which the per-method direction tests do not see: a wrong eps, alpha or r fails here."""
    seeds = [4, 9]
    r = {"r": 3.0} if method == "sdst-" else {}
    protector = Protector(tiny_model, method, eps=16 / 255, step_size=1 / 255, steps=4, **r)
    got = protector.protect(images_8bit, seeds=seeds).images
    want = paper_loop(tiny_model, images_8bit, method, seeds, 16, 1, 4, **r)
    assert torch.equal(got, want)
    for eps_255, alpha_255 in [(2, 1), (16, 0.5)]:  # the check can fail: eps, alpha
        assert not torch.equal(
            got, paper_loop(tiny_model, images_8bit, method, seeds, eps_255, alpha_255, 4, **r)
        )
    if method == "sdst-":  # ... and r, which only sdst- reads
        assert not torch.equal(got, paper_loop(tiny_model, images_8bit, method, seeds, 16, 1, 4))


@pytest.mark.parametrize("ahead", [1, 3])
def test_random_inputs_drawn_steps_ahead_are_the_step_by_step_draws(
    tiny_model, images_8bit, ahead, monkeypatch
):
    """The per-step draws go to the device a block of steps at a time (one copy instead of
    three synchronising ones a step); across block boundaries (7 steps in blocks of 3: the last
    one short) each step still gets the draws of the written-out loop."""
    import mimicshield.protector as protector_module

    monkeypatch.setattr(protector_module, "DRAW_AHEAD", ahead)
    got = Protector(tiny_model, "sds-", eps=16 / 255, step_size=1 / 255, steps=7)
    got = got.protect(images_8bit, seeds=[4, 9]).images
    assert torch.equal(got, paper_loop(tiny_model, images_8bit, "sds-", [4, 9], 16, 1, 7))


def test_one_copy_moves_a_block_of_draws():
    """Stacked on the CPU, then one transfer; on the CPU nothing is copied at all."""
    from mimicshield.protector import _to_device_at_once

    draws = [torch.full((2, 3), float(i)) for i in range(4)]
    moved = _to_device_at_once(draws, torch.device("cpu"))
    assert moved.shape == (4, 2, 3) and torch.equal(moved[2], draws[2])


@pytest.mark.parametrize("method", ["sds-", "photoguard"])
def test_a_grey_image_gets_one_perturbation_for_its_three_channels(tiny_model, method):
    """It steps along the sign of the summed channel gradients and stays grey (three
    independent perturbations averaged at saving were weaker, and not a sign step)."""
    generator = torch.Generator().manual_seed(7)
    grey = torch.randint(0, 256, (2, 1, 32, 32), generator=generator).float() / 255
    images = grey.expand(2, 3, 32, 32).contiguous()
    got = Protector(tiny_model, method, eps=16 / 255, step_size=1 / 255, steps=4)
    got = got.protect(images, seeds=[4, 9]).images
    assert torch.equal(got, paper_loop(tiny_model, images, method, [4, 9], 16, 1, 4))
    assert torch.equal(got[:, 0], got[:, 1]) and torch.equal(got[:, 1], got[:, 2])
