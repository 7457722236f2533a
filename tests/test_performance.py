"""Performance options (low memory, compile) and the MPS guards.

No MPS machine runs these tests: the MPS decisions are tested with the platform and the macOS
version mocked, which proves the logic, not the kernels.
"""

from __future__ import annotations

import pytest
import torch

from mimicshield import mps
from mimicshield.bench import architecture, bench_images, build_engine_model
from mimicshield.performance import (
    attention_processors,
    compile_model,
    enable_low_memory,
    uses_sdpa,
)
from mimicshield.protector import Protector


def tiny_model():
    return build_engine_model(architecture(tiny=True), torch.device("cpu"), torch.float32)


def test_sdpa_is_the_default_attention():
    model = tiny_model()
    assert attention_processors(model) == ["AttnProcessor2_0"]
    assert uses_sdpa(model)


@pytest.mark.parametrize("method", ["sds-", "advdm+", "mist"])
def test_low_memory_changes_memory_not_results(method, one_thread):
    """Checkpointing recomputes the same forward pass: the protected bytes must not change."""
    images = bench_images(2, 32, seed=3)
    plain = Protector(tiny_model(), method, steps=2)(images)

    model = tiny_model()
    enable_low_memory(model, prompts=["a photo"])
    assert model.text_encoder is None
    assert model.vae.encoder.gradient_checkpointing
    assert model.unet.is_gradient_checkpointing
    assert uses_sdpa(model)  # no slicing where SDPA is available
    lean = Protector(model, method, steps=2)(images)
    torch.testing.assert_close(lean, plain, rtol=0, atol=0)


def test_low_memory_without_prompts_keeps_the_text_encoder():
    model = tiny_model()
    enable_low_memory(model)
    assert model.text_encoder is not None


def test_compile_model_compiles_unet_and_encoder_and_times_the_warmup(monkeypatch):
    compiled = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kwargs: compiled.append((self, kwargs))
    )
    model = tiny_model()
    assert compile_model(model, mode="max-autotune-no-cudagraphs") == 0.0
    assert [module for module, _ in compiled] == [model.vae.encoder, model.unet]
    assert compiled[0][1] == {"mode": "max-autotune-no-cudagraphs"}

    calls = []
    seconds = compile_model(model, warmup=lambda: calls.append(1))
    assert calls == [1] and seconds >= 0


# --- MPS ---------------------------------------------------------------------------------------


def test_mps_fallback_is_set_on_macos_before_torch_loads():
    environ: dict[str, str] = {}
    assert mps.enable_mps_fallback(environ, platform="darwin", torch_loaded=False)
    assert environ == {"PYTORCH_ENABLE_MPS_FALLBACK": "1"}


def test_mps_fallback_respects_the_user_and_other_platforms():
    environ = {"PYTORCH_ENABLE_MPS_FALLBACK": "0"}
    assert not mps.enable_mps_fallback(environ, platform="darwin", torch_loaded=False)
    assert environ == {"PYTORCH_ENABLE_MPS_FALLBACK": "0"}

    environ = {}
    assert not mps.enable_mps_fallback(environ, platform="linux", torch_loaded=False)
    assert environ == {}


def test_mps_fallback_reports_when_torch_loaded_first():
    environ: dict[str, str] = {}
    assert not mps.enable_mps_fallback(environ, platform="darwin", torch_loaded=True)
    assert environ == {"PYTORCH_ENABLE_MPS_FALLBACK": "1"}  # still set, for child processes


def test_mps_dtype_guard(monkeypatch):
    device = torch.device("mps")  # a descriptor only: no MPS device is touched
    assert mps.check_mps_dtype(torch.float16, device) == torch.float16
    with pytest.raises(ValueError, match="float64"):
        mps.check_mps_dtype(torch.float64, device)

    monkeypatch.setattr(mps, "mps_supports_bf16", lambda: False)
    with pytest.warns(UserWarning, match="macOS 14"):
        assert mps.check_mps_dtype(torch.bfloat16, device) == torch.float16
    monkeypatch.setattr(mps, "mps_supports_bf16", lambda: True)
    assert mps.check_mps_dtype(torch.bfloat16, device) == torch.bfloat16


def test_other_devices_keep_their_dtype():
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        assert mps.check_mps_dtype(dtype, torch.device("cpu")) == dtype


def test_load_models_applies_the_mps_guard(tiny_model_dir, monkeypatch):
    """load_models on 'mps' with bf16 on an old macOS falls back to fp16 before loading."""
    from mimicshield import models

    seen = {}

    def fake_check(dtype, device):
        seen["args"] = (dtype, device)
        return torch.float32  # keep the rest of the load on the CPU path

    monkeypatch.setattr(models, "check_mps_dtype", fake_check)
    model = models.load_models(str(tiny_model_dir), device="cpu", dtype="bf16")
    assert seen["args"] == (torch.bfloat16, torch.device("cpu"))
    assert model.dtype == torch.float32


def test_protect_low_memory_writes_the_same_bytes(tiny_model_dir, tmp_path, one_thread):
    """``protect --low-memory`` only changes how memory is spent, never the protected file."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from mimicshield.cli.main import app

    image = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    outputs = {}
    for name, flags in (("plain", []), ("lean", ["--low-memory"])):
        out = tmp_path / name
        args = ["protect", str(image), "-o", str(out), "--model", str(tiny_model_dir)]
        args += ["--device", "cpu", "--dtype", "fp32", "--steps", "2", "--method", "mist", *flags]
        result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        outputs[name] = np.asarray(Image.open(out / "in.png"))
    np.testing.assert_array_equal(outputs["lean"], outputs["plain"])
