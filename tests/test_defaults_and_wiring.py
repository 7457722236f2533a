"""Issue 2's defaults, and the Protector's loop for advdm-, encoder, mist and sds+ written out.

``test_protector.py`` replays sds-, photoguard, sdst- and advdm+ by hand. The replay here covers
the other four. It uses only raw diffusers calls (``vae.encode(x).latent_dist``,
``DDPMScheduler.add_noise``, ``unet(...).sample``, the raw tokenizer and text encoder), never
the package's objectives. Every expected number is taken from issue 2's text: ε = 16/255 and
α = 1/255 on the [0, 1] scale, so 32/255 and 2/255 in [-1, 1], 100 steps, the prompt "a photo",
r = 5, the Mist weight 1e4, t ~ U{0..999}, and a random start U[-ε, ε] for advdm, photoguard,
encoder and mist but not for the SDS methods.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import typer
from diffusers import DDPMScheduler
from PIL import Image
from typer.testing import CliRunner

from mimicshield.cli import options as cli_options
from mimicshield.cli import protect as cli_protect
from mimicshield.cli.main import app
from mimicshield.defaults import DEFAULT_METHOD, DEFAULT_MODEL
from mimicshield.methods import METHODS, MIST_SEMANTIC_WEIGHT, SDST_DEFAULT_R
from mimicshield.protector import CATEGORY_PROMPTS, DEFAULT_PROMPT, ProtectionConfig, Protector
from mimicshield.targets import target_pattern

# --- issue 2, transcribed -----------------------------------------------------------------------

ISSUE_EPS_255, ISSUE_ALPHA_255 = 16, 1  # "ε = 16/255 and α = 1/255 on the [0, 1] pixel scale"
ISSUE_EPS, ISSUE_ALPHA = 32 / 255, 2 / 255  # "so 32/255 and 2/255 in [-1, 1]"
ISSUE_STEPS = 100
ISSUE_PROMPT = "a photo"
ISSUE_R = 5
ISSUE_MIST_WEIGHT = 1e4
ISSUE_TIMESTEPS = 1000  # t ~ U{0..999}
ISSUE_MODEL = "CompVis/stable-diffusion-v1-4"
ISSUE_CATEGORY_PROMPTS = {
    "portrait": "a portrait photo",
    "anime": "an anime picture",
    "artwork": "an artwork painting",
    "landscape": "a landscape photo",
}
# "A random start U[-ε, ε] for advdm, photoguard, encoder and mist; none for the SDS methods."
ISSUE_RANDOM_START = {
    "advdm+": True,
    "advdm-": True,
    "photoguard": True,
    "encoder": True,
    "mist": True,
    "sds+": False,
    "sds-": False,
    "sdst-": False,
}
REPLAYED = ["advdm-", "encoder", "mist", "sds+"]
SEEDS = [4, 9]
STEPS = 4


# --- the hand-written replay ----------------------------------------------------------------


@pytest.fixture(scope="module")
def raw(tiny_model, tiny_model_dir):
    """The diffusers pieces to replay with: the tiny model's own VAE, UNet, tokenizer and text
    encoder, and its noise schedule read from disk by diffusers itself."""
    scheduler = DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    tokenizer = tiny_model.tokenizer
    with torch.no_grad():
        tokens = tokenizer(
            ISSUE_PROMPT,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        cond = tiny_model.text_encoder(tokens)[0]
    return dict(
        vae=tiny_model.vae,
        unet=tiny_model.unet,
        scheduler=scheduler,
        cond=cond,
        sf=tiny_model.vae.config.scaling_factor,
    )


def eps_hat(raw, z, t, n, cond) -> torch.Tensor:
    """eps_hat = UNet(z_t, t, c), with diffusers' z_t = sqrt(abar_t) z + sqrt(1 - abar_t) n."""
    z_t = raw["scheduler"].add_noise(z, n, t)
    return raw["unet"](z_t, t, encoder_hidden_states=cond).sample


def semantic(raw, z, t, n, cond) -> torch.Tensor:
    """L_S = mean((eps_hat - n)^2), per image."""
    return ((eps_hat(raw, z, t, n, cond) - n) ** 2).mean(dim=(1, 2, 3))


def replay(
    raw,
    images: torch.Tensor,
    method: str,
    seeds: list[int],
    steps: int,
    *,
    random_start: bool | None = None,
    flip: bool = False,
    fixed_latent: str = "mean",
) -> torch.Tensor:
    """Issue 2's loop for advdm-, encoder, mist and sds+, written out from the formulas.

    Each image has its own CPU generator, seeded with its seed. It draws the random start
    (if any) first, then for each step t and n (for the methods that use the UNet) and the
    posterior draw of E(x), in that order. ``flip`` reverses the step's sign, and
    ``fixed_latent="sample"`` takes E(x0) or E(y) as a posterior sample, not the mean. These
    are the wrong variants that show the comparison can fail.
    """
    vae, scheduler, sf = raw["vae"], raw["scheduler"], raw["sf"]
    batch, _, height, width = images.shape
    cond = raw["cond"].expand(batch, -1, -1)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    x0 = images * 2 - 1
    down = 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's downsampling factor
    latent = (1, vae.config.latent_channels, height // down, width // down)
    if random_start is None:
        random_start = ISSUE_RANDOM_START[method]

    def fixed(image: torch.Tensor) -> torch.Tensor:
        """E(image) as the run keeps it fixed: the posterior mean (or, wrongly, a sample)."""
        with torch.no_grad():
            dist = vae.encode(image).latent_dist
            if fixed_latent == "mean":
                return sf * dist.mean
            return sf * dist.sample(generator=torch.Generator().manual_seed(123))

    source = fixed(x0) if method == "encoder" else None
    target = None
    if method == "mist":  # the built-in pattern, in [-1, 1]; one latent for the batch
        target = fixed(target_pattern(height, width)[None] * 2 - 1)

    x = x0.clone()
    if random_start:  # U[-ε, ε] per pixel, then clipped to the image range
        start = torch.stack([torch.rand(x0.shape[1:], generator=g) * 2 - 1 for g in generators])
        x = (x0 + ISSUE_EPS * start).clamp(-1, 1)

    for _ in range(steps):
        if method != "encoder":  # one t ~ U{0..999} and one n ~ N(0, I) per image and step
            t = torch.cat(
                [
                    torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g)
                    for g in generators
                ]
            )
            n = torch.cat([torch.randn(latent, generator=g) for g in generators])
        x = x.detach().requires_grad_(True)
        # E(x) = 0.18215 * a posterior sample, drawn by diffusers from each image's generator
        z = sf * vae.encode(x).latent_dist.sample(generator=generators)

        if method == "advdm-":  # descend L_S through the UNet and the encoder
            sign = -torch.autograd.grad(semantic(raw, z, t, n, cond).sum(), x)[0].sign()
        elif method == "encoder":  # ascend sum((E(x) - E(x0))^2)
            sign = torch.autograd.grad(((z - source) ** 2).sum(), x)[0].sign()
        elif method == "mist":  # descend L_T - 1e4 L_S
            l_t = ((z - target) ** 2).sum(dim=(1, 2, 3))
            loss = l_t - ISSUE_MIST_WEIGHT * semantic(raw, z, t, n, cond)
            sign = -torch.autograd.grad(loss.sum(), x)[0].sign()
        elif method == "sds+":  # x + α sign(g), g = (dE/dx)^T (eps_hat - n), UNet without grads
            with torch.no_grad():
                residual = eps_hat(raw, z, t, n, cond) - n
            g = torch.autograd.grad(z, x, grad_outputs=residual)[0]
            sign = g.sign()
        else:
            raise AssertionError(method)
        if flip:
            sign = -sign
        # x <- clip(x0 + clip(x - x0, -ε, ε), -1, 1)
        x = (x0 + (x.detach() + ISSUE_ALPHA * sign - x0).clamp(-ISSUE_EPS, ISSUE_EPS)).clamp(-1, 1)

    # round to 8 bits, and re-project so that the saved file stays within ε
    levels = torch.round((x + 1) / 2 * 255)
    clean = torch.round(images * 255)
    low, high = (clean - ISSUE_EPS_255).clamp(min=0), (clean + ISSUE_EPS_255).clamp(max=255)
    return torch.minimum(torch.maximum(levels, low), high) / 255


def test_the_method_registry_random_start_flags_are_the_issues():
    assert {name: m.random_start for name, m in METHODS.items()} == ISSUE_RANDOM_START
    for name, expected in ISSUE_RANDOM_START.items():  # None takes the method's own choice
        assert ProtectionConfig(method=name).uses_random_start is expected
        assert ProtectionConfig(method=name, random_start=not expected).uses_random_start is (
            not expected
        )


def test_the_replay_schedule_is_the_issues(raw, tiny_model):
    """The replay draws t from U{0..999}, as the issue says, and the adapter's schedule is
    diffusers' own one."""
    assert raw["scheduler"].config.num_train_timesteps == ISSUE_TIMESTEPS
    assert tiny_model.num_train_timesteps == ISSUE_TIMESTEPS
    assert raw["sf"] == pytest.approx(0.18215)
    torch.testing.assert_close(tiny_model.alphas_cumprod, raw["scheduler"].alphas_cumprod)


@pytest.mark.parametrize("method", REPLAYED)
def test_the_protector_is_the_issues_loop_for_the_other_four_methods(
    raw, tiny_model, images_8bit, method, one_thread
):
    """Protector's own defaults (ε, α, prompt, posterior sample, 8-bit rounding), with only
    ``steps`` lowered, give the hand replay's bytes. The wrong variants (random start
    toggled, sign flipped, and for encoder and mist a sampled E(x0) or E(y) instead of the
    posterior mean) do not, and turning the random start on or off through the config matches
    the replay that does the same."""
    got = Protector(tiny_model, method, steps=STEPS).protect(images_8bit, seeds=SEEDS).images
    want = replay(raw, images_8bit, method, SEEDS, STEPS)
    assert torch.equal(got, want)
    assert (got - images_8bit).abs().max() * 255 <= ISSUE_EPS_255 + 1e-4
    assert torch.equal(got, (got * 255).round() / 255)  # on the 8-bit grid

    toggled = not ISSUE_RANDOM_START[method]
    assert not torch.equal(
        got, replay(raw, images_8bit, method, SEEDS, STEPS, random_start=toggled)
    )
    assert not torch.equal(got, replay(raw, images_8bit, method, SEEDS, STEPS, flip=True))
    override = Protector(tiny_model, method, steps=STEPS, random_start=toggled)
    assert torch.equal(
        override.protect(images_8bit, seeds=SEEDS).images,
        replay(raw, images_8bit, method, SEEDS, STEPS, random_start=toggled),
    )
    if method in ("encoder", "mist"):  # E(x0), E(y): the posterior mean, not a sample
        sampled = replay(raw, images_8bit, method, SEEDS, STEPS, fixed_latent="sample")
        assert not torch.equal(got, sampled)


def test_zero_steps_return_the_random_start_or_the_image(raw, tiny_model, images_8bit, one_thread):
    """With no steps, what is left is the start: U[-ε, ε] around x0 for the methods that
    have one, rounded to 8 bits, and x0 itself for sds+."""
    for method in REPLAYED:
        got = Protector(tiny_model, method, steps=0).protect(images_8bit, seeds=SEEDS).images
        assert torch.equal(got, replay(raw, images_8bit, method, SEEDS, 0))
        if ISSUE_RANDOM_START[method]:
            linf = (got - images_8bit).abs().flatten(1).amax(1) * 255
            assert (linf > ISSUE_EPS_255 - 1.5).all() and (linf <= ISSUE_EPS_255 + 1e-4).all()
        else:
            assert torch.equal(got, images_8bit)


# --- defaults ----------------------------------------------------------------------------------


def test_protection_config_defaults_are_the_issues():
    cfg = ProtectionConfig()
    assert cfg.method == "sds-" == DEFAULT_METHOD  # "sds- (the default; the paper recommends it)"
    assert cfg.eps == pytest.approx(ISSUE_EPS_255 / 255)
    assert cfg.step_size == pytest.approx(ISSUE_ALPHA_255 / 255)
    assert cfg.steps == ISSUE_STEPS
    assert cfg.prompt == ISSUE_PROMPT == DEFAULT_PROMPT
    assert cfg.r == ISSUE_R == SDST_DEFAULT_R
    assert cfg.posterior == "sample"  # "the reference samples, and an option uses the mean"
    assert cfg.quantize_levels == 255  # "Round to 8 bits and re-project"
    assert cfg.random_start is None and not cfg.uses_random_start  # sds-: none
    assert cfg.robust == ()
    assert MIST_SEMANTIC_WEIGHT == ISSUE_MIST_WEIGHT
    assert list(METHODS) == list(ISSUE_RANDOM_START)  # the eight methods of the table
    protector = Protector(object())  # the API's defaults are the config's
    assert protector.config == cfg and protector.method is METHODS["sds-"]


def test_the_default_model_and_category_prompts_are_the_papers():
    assert DEFAULT_MODEL == ISSUE_MODEL
    assert cli_options.DEFAULTS == {"model": ISSUE_MODEL, "method": "sds-"}
    assert CATEGORY_PROMPTS == ISSUE_CATEGORY_PROMPTS
    assert [c.value for c in cli_protect.Category] == list(ISSUE_CATEGORY_PROMPTS)


def _protect_command():
    return typer.main.get_command(app).commands["protect"]


def test_the_cli_protect_defaults_are_the_issues():
    """Read from the command line parser and from the signature, without running anything."""
    params = {p.name: p for p in _protect_command().params}
    flags = {opt for p in params.values() for opt in p.opts}
    issue_flags = ["--method", "--eps", "--steps", "--step-size", "--prompt", "--category"]
    issue_flags += ["--target", "--model", "--device", "--dtype", "--seed", "--out", "-o"]
    assert set(issue_flags) <= flags
    expected = {
        "eps": ISSUE_EPS_255,  # 1/255 units, like the paper
        "step_size": ISSUE_ALPHA_255,
        "steps": ISSUE_STEPS,
        "method": "sds-",
        "sdst_r": SDST_DEFAULT_R,
        "device": "auto",
        "dtype": "auto",
        "seed": ProtectionConfig().seed,
        "prompt": None,  # None means DEFAULT_PROMPT, "a photo"
        "category": None,
        "target": None,
        "model": None,  # None means DEFAULT_MODEL
    }
    signature = inspect.signature(cli_protect.protect).parameters
    for name, value in expected.items():
        assert params[name].default == value, name
        assert signature[name].default == value, name
    assert SDST_DEFAULT_R == ISSUE_R
    assert params["posterior"].default == "sample"


class _Stop(Exception):
    """Raised by the recording Protector once it has seen what the CLI built."""


@pytest.fixture
def recorded(monkeypatch, tiny_model, tmp_path):
    """Run ``protect`` up to the Protector: the loader hands back the tiny model (recording
    which model it was asked for), and the Protector records its config and stops."""
    seen: dict = {}

    def load_models(source, **kwargs):
        seen["source"] = source
        return dataclasses.replace(tiny_model, _prompt_cache={})

    def protector(model, method, **kwargs):
        seen["config"] = Protector(model, method, **kwargs).config
        raise _Stop

    monkeypatch.setattr("mimicshield.models.load_models", load_models)
    monkeypatch.setattr("mimicshield.protector.Protector", protector)
    Image.new("RGB", (16, 16), (120, 30, 200)).save(tmp_path / "art.png")

    def invoke(*args: str) -> dict:
        argv = ["protect", str(tmp_path / "art.png"), "-o", str(tmp_path / "out"), *args]
        result = CliRunner().invoke(app, argv)
        assert isinstance(result.exception, _Stop), result.output
        return seen

    return invoke


def test_the_cli_with_no_options_builds_the_default_config_and_model(recorded):
    """The CLI's 16 and 1 (in 1/255 units) become the API's 16/255 and 1/255, and so on: the
    config it builds is ProtectionConfig's default, for the paper's model."""
    seen = recorded()
    assert seen["source"] == ISSUE_MODEL
    assert seen["config"] == ProtectionConfig()


@pytest.mark.parametrize("category", list(ISSUE_CATEGORY_PROMPTS))
def test_the_cli_category_sets_the_papers_prompt(recorded, category):
    assert recorded("--category", category)["config"].prompt == ISSUE_CATEGORY_PROMPTS[category]
