"""Shared fixtures: tiny random Stable Diffusion models and the real assets in ../shared."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT.parent / "shared" / "assets"
IMAGES = ASSETS / "images"
WEIGHTS = ASSETS / "weights"

# Debian's Chromium, driven by playwright without any browser download. The flags keep it from
# reaching for the network, which this machine does not have.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

requires_assets = pytest.mark.skipif(
    not ASSETS.is_dir(), reason=f"real test assets not found at {ASSETS} (../shared/assets)"
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SD-1.x-shaped model saved with ``save_pretrained``, as a user's folder would be."""
    from mimicshield.testing import save_tiny_stable_diffusion

    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny model loaded through the real loader, on the CPU in fp32."""
    from mimicshield.models import load_models

    return load_models(str(tiny_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_model_with_decoder(tiny_model_dir):
    """The tiny model with its VAE decoder, as the mimicry simulations need it."""
    from mimicshield.models import load_models

    return load_models(str(tiny_model_dir), device="cpu", dtype="fp32", with_decoder=True)


@pytest.fixture(scope="session")
def tiny_family_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD 2.x-v and SDXL models with the real config shapes, saved as diffusers saves
    them: built once for every test module that loads another family."""
    from mimicshield.testing import save_tiny_family_model

    root = tmp_path_factory.mktemp("families")
    return {name: save_tiny_family_model(root / name, name) for name in ("sd2-v", "sdxl")}


def assert_one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    """The error is one line (what the CLI prints) and names each of ``needles``."""
    message = str(error.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


@pytest.fixture
def images_8bit() -> torch.Tensor:
    """Two 32x32 images on the 8-bit grid, in [0, 1], as decoded image files are."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, 256, (2, 3, 32, 32), generator=generator).float() / 255


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Every test starts from the same global torch RNG state, so a test that draws without a
    generator of its own still sees the same numbers on every run and in any order."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny networks, which are all overhead: with more threads than
    free cores, OpenMP's spin-waiting makes each step 10-100x slower on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def interrupt_second_save(monkeypatch) -> list[Path]:
    """``images.save_png`` raises KeyboardInterrupt (Ctrl-C) at its second call, as if the user
    pressed it mid-batch; returns the destinations it was called with."""
    from mimicshield import images

    real, calls = images.save_png, []

    def save_then_stop(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "save_png", save_then_stop)
    return calls


@pytest.fixture
def web_service(tmp_path, tiny_model_dir):
    """A web-app ProtectionService on the tiny model with web_cases.FAST, closed after."""
    from web_cases import FAST

    from mimicshield.webapp import ProtectionService, ProtectSettings

    settings = ProtectSettings(model=str(tiny_model_dir), **FAST)
    service = ProtectionService(settings, work_root=tmp_path / "work")
    yield service
    service.close()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache of this test's own, which every loader reads."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return cache


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules hold the same tensors under the same names."""
    got, want = a.state_dict(), b.state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
