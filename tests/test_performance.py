"""Performance options (low memory, compile) and the MPS guards.

No MPS machine runs these tests: the MPS decisions are tested with the platform and the macOS
version mocked, which proves the logic, not the kernels.
"""

from __future__ import annotations

import pytest
import torch

from mimicshield import mps
from mimicshield.bench import architecture, bench_images, build_engine_model
from mimicshield.methods import METHODS
from mimicshield.performance import (
    AUTO_BATCH_LIMIT,
    AutoBatchSize,
    FrozenConv2d,
    GroupNormSiLU,
    apply_performance_options,
    attention_processors,
    auto_batch_size,
    compile_model,
    enable_low_memory,
    fuse_group_norm_silu,
    offload_unet,
    saved_bytes_per_pixel,
    saved_tensor_bytes,
    stop_saving_frozen_conv_inputs,
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
    assert any(isinstance(m, GroupNormSiLU) for m in model.vae.encoder.modules())
    assert model.unet.is_gradient_checkpointing
    assert uses_sdpa(model)  # no slicing where SDPA is available
    lean = Protector(model, method, steps=2)(images)
    torch.testing.assert_close(lean, plain, rtol=0, atol=0)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_group_norm_silu_is_the_pair_and_keeps_only_its_input(layout):
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    norm.requires_grad_(False)
    fused = GroupNormSiLU(4, 16, eps=1e-6).requires_grad_(False)
    fused.load_state_dict(norm.state_dict())
    x = torch.randn(2, 16, 12, 10).to(memory_format=layout).requires_grad_(True)
    weights = torch.randn(2, 16, 12, 10)

    def pair(t):
        return torch.nn.functional.silu(norm(t))

    expected = pair(x)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    got = fused(x)
    (grad,) = torch.autograd.grad((got * weights).sum(), x)
    assert torch.equal(got, expected)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    input_bytes = x.numel() * x.element_size()
    assert saved_tensor_bytes(pair, x) > 1.9 * input_bytes  # the input and the norm's output
    assert saved_tensor_bytes(fused, x) == input_bytes


def test_fusing_the_encoder_keeps_its_numbers_and_halves_what_it_keeps():
    model = tiny_model()
    x = (bench_images(1, 32, seed=5) * 2 - 1).requires_grad_(True)
    z = model.encode(x)
    (grad,) = torch.autograd.grad(z, x, torch.ones_like(z))
    before = saved_tensor_bytes(model.encode, x)
    from diffusers.models.resnet import ResnetBlock2D

    resnets = sum(isinstance(m, ResnetBlock2D) for m in model.vae.encoder.modules())
    assert fuse_group_norm_silu(model.vae.encoder) == 2 * resnets + 1  # and the output norm
    fused_z = model.encode(x)
    (fused_grad,) = torch.autograd.grad(fused_z, x, torch.ones_like(fused_z))
    assert torch.equal(fused_z, z)
    torch.testing.assert_close(fused_grad, grad, rtol=0, atol=1e-6)
    assert saved_tensor_bytes(model.encode, x) < 0.6 * before
    assert set(model.vae.state_dict()) == set(tiny_model().vae.state_dict())


def test_unet_resnets_keep_their_silu_for_the_time_embedding():
    """A UNet resnet also passes the time embedding through its SiLU: only the UNet's output
    norm is fused, and the noise prediction is unchanged."""
    model = tiny_model()
    z = torch.randn(1, 4, 8, 8)
    t = torch.tensor([10])
    cond = model.embed_prompt("a photo")
    with torch.no_grad():
        before = model.predict_noise(z, t, cond)
        assert fuse_group_norm_silu(model.unet) == 1
        assert torch.equal(model.predict_noise(z, t, cond), before)
    assert all(type(m.nonlinearity) is torch.nn.SiLU for m in model.unet.down_blocks[0].resnets)


def test_low_memory_streaming_the_unet_keeps_the_results(one_thread):
    """Group offloading only moves weights; here it is wired CPU -> CPU, which proves the hooks
    leave every step's numbers alone (the memory effect needs a CUDA device: ``bench``)."""
    images = bench_images(2, 32, seed=4)
    plain = Protector(tiny_model(), "sds-", steps=2)(images)
    model = tiny_model()
    offload_unet(model)
    streamed = Protector(model, "sds-", steps=2)(images)
    torch.testing.assert_close(streamed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["sds-", "advdm+", "mist", "photoguard"])
def test_low_memory_offloads_the_unet_only_without_unet_gradients(method, monkeypatch):
    from mimicshield import performance

    offloaded = []
    monkeypatch.setattr(performance, "offload_unet", lambda model: offloaded.append(model))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    model = tiny_model()
    model.embed_prompt("a photo")  # on the CPU, before the device below is pretended
    model.device = torch.device("cuda")  # a descriptor only: nothing runs on it
    apply_performance_options(model, ["a photo"], low_memory=True, compile=False, method=method)
    assert (model in offloaded) is (method == "sds-")  # photoguard has no UNet left to offload

    model = tiny_model()  # on the CPU there is nowhere to offload to
    apply_performance_options(model, ["a photo"], low_memory=True, compile=False, method="sds-")
    assert not offloaded[1:]


@pytest.mark.parametrize(("method", "compiles_unet"), [("sds-", False), ("advdm+", True)])
def test_a_streamed_unet_is_not_compiled(method, compiles_unet, monkeypatch):
    """Offloading hooks move weights mid-forward: compiling through them is not attempted."""
    from mimicshield import performance

    compiled = []
    monkeypatch.setattr(performance, "offload_unet", lambda model: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append(self))
    model = tiny_model()
    model.embed_prompt("a photo")
    model.device = torch.device("cuda")  # a descriptor only: nothing runs on it
    apply_performance_options(model, ["a photo"], True, True, method=method)
    assert model.vae.encoder in compiled
    assert (model.unet in compiled) is compiles_unet


@pytest.mark.parametrize("method", ["photoguard", "encoder"])
def test_methods_without_the_unet_drop_it_and_keep_their_results(method, one_thread):
    images = bench_images(2, 32, seed=7)
    plain = Protector(tiny_model(), method, steps=2)(images)
    model = tiny_model()
    apply_performance_options(model, ["a photo"], low_memory=False, compile=False, method=method)
    assert model.unet is None and model.text_encoder is None
    torch.testing.assert_close(Protector(model, method, steps=2)(images), plain, rtol=0, atol=0)


def test_without_a_method_the_unet_stays():
    """The web app shares its model with the mimicry preview, which needs the UNet."""
    model = tiny_model()
    apply_performance_options(model, ["a photo"], low_memory=False, compile=False)
    assert model.unet is not None


@pytest.mark.parametrize("name", sorted(METHODS))
def test_backprops_unet_says_whether_gradients_flow_through_the_unet(name, one_thread):
    """The flag that decides UNet offloading, checked against what each method really does."""
    model = tiny_model()
    seen = []
    model.unet.register_forward_hook(lambda module, args, out: seen.append(out.sample))
    Protector(model, name, steps=1)(bench_images(1, 32, seed=5))
    assert bool(seen) is METHODS[name].needs_unet
    assert any(out.requires_grad for out in seen) is METHODS[name].backprops_unet


def test_performance_options_always_release_the_text_encoder():
    model = tiny_model()
    before = model.embed_prompt("a photo").clone()
    model._prompt_cache.clear()  # embedded again by apply_performance_options itself
    apply_performance_options(model, ["a photo"], low_memory=False, compile=False)
    assert model.text_encoder is None
    torch.testing.assert_close(model.embed_prompt("a photo"), before)  # the cached embedding
    with pytest.raises(RuntimeError, match="released"):
        model.embed_prompt("another prompt")


# --- convolutions with frozen weights ----------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "stride": 2, "padding": 0},
        {"kernel_size": 1},
        {"kernel_size": 3, "padding": 2, "dilation": 2, "groups": 2},
    ],
)
def test_frozen_conv_gives_the_input_gradient_and_keeps_nothing(config, one_thread):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, **config).requires_grad_(False)
    frozen = torch.nn.Conv2d(4, 6, **config).requires_grad_(False)
    frozen.load_state_dict(conv.state_dict())
    assert stop_saving_frozen_conv_inputs(frozen) == 1 and isinstance(frozen, FrozenConv2d)
    x = torch.randn(2, 4, 17, 13)
    upstream = torch.randn_like(conv(x))

    expected = torch.autograd.grad(conv(x.requires_grad_(True)), x, upstream)[0]
    got = torch.autograd.grad(frozen(x), x, upstream)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(frozen(x), conv(x), rtol=0, atol=0)
    assert saved_tensor_bytes(conv, x) >= x.numel() * x.element_size()  # torch keeps the input
    assert saved_tensor_bytes(frozen, x) == 0


def test_frozen_conv_falls_back_when_the_weight_trains(one_thread):
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    stop_saving_frozen_conv_inputs(conv)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    conv(x).square().sum().backward()
    assert conv.weight.grad is not None and x.grad is not None
    assert saved_tensor_bytes(conv, x) > 0


def test_loaded_encoders_keep_less_for_backward(one_thread):
    """The encoder as protection loads it keeps less for its backward pass than a plain one,
    with the same input gradient."""
    model = tiny_model()
    plain = build_engine_model(architecture(tiny=True), torch.device("cpu"), torch.float32)
    for module in plain.vae.modules():  # undo the swap, for comparison
        if isinstance(module, FrozenConv2d):
            module.__class__ = torch.nn.Conv2d
    x = bench_images(1, 32, seed=6) * 2 - 1

    def encoder_gradient(vae):
        x_in = x.clone().requires_grad_(True)
        vae.encode(x_in).latent_dist.mean.sum().backward()
        return x_in.grad

    torch.testing.assert_close(encoder_gradient(model.vae), encoder_gradient(plain.vae))
    x_in = x.clone().requires_grad_(True)
    lean = saved_tensor_bytes(lambda: model.vae.encode(x_in))
    full = saved_tensor_bytes(lambda: plain.vae.encode(x_in))
    assert lean < 0.8 * full


# --- batch size -----------------------------------------------------------------------------


def test_auto_batch_size_fits_the_budget_between_one_and_the_limit():
    assert auto_batch_size(per_image_bytes=10, budget_bytes=35, limit=8) == 3
    assert auto_batch_size(per_image_bytes=10, budget_bytes=5, limit=8) == 1  # never 0
    assert auto_batch_size(per_image_bytes=10, budget_bytes=-5, limit=8) == 1
    assert auto_batch_size(per_image_bytes=10, budget_bytes=10_000, limit=8) == 8


def test_frozen_weights_and_their_views_are_not_counted_as_activations():
    """F.linear saves weight.t(), a view of the parameter: counting it made the UNet's weights
    look like 850 MiB of activations, and --batch-size auto pick 1 for AdvDM and Mist."""
    layer = torch.nn.Linear(64, 32).requires_grad_(False)
    x = torch.zeros(5, 64, requires_grad=True)
    # for the input's gradient autograd keeps only weight.t(), which is the weight itself
    assert saved_tensor_bytes(layer, x) == 0
    assert saved_tensor_bytes(lambda x: layer(x).exp(), x) == 5 * 32 * 4  # exp keeps its output


def test_saved_bytes_grow_with_the_pixel_count(one_thread):
    """The per-pixel rate measured at 64 px predicts what a larger image keeps."""
    model = tiny_model()
    rate = saved_bytes_per_pixel(model)
    x = (bench_images(1, 64, seed=8) * 2 - 1).requires_grad_(True)
    kept = saved_tensor_bytes(lambda: model.encode(x))
    assert rate > 0
    assert kept == pytest.approx(rate * 64 * 64, rel=0.25)


def test_auto_batch_size_follows_the_card_and_the_image(monkeypatch):
    model = tiny_model()
    assert AutoBatchSize([model])(512, 512) == 1  # the CPU: batches do not pay

    card = {"total_memory": 0}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), card)())
    monkeypatch.setattr(  # the UNet's activations double what AdvDM and Mist keep
        "mimicshield.performance.saved_bytes_per_pixel",
        lambda model, through_unet=False: 8000.0 if through_unet else 4000.0,
    )
    model.device = torch.device("cuda")  # a descriptor only: nothing runs on it
    fitting = AutoBatchSize([model])
    sizes = {}
    for gib in (1, 4, 16, 80):
        card["total_memory"] = gib * 2**30
        sizes[gib] = fitting(512, 512)
    assert sizes[1] == 1 and sizes[80] == AUTO_BATCH_LIMIT
    assert sizes[1] <= sizes[4] <= sizes[16] <= sizes[80]
    card["total_memory"] = 4 * 2**30
    assert fitting(256, 256) > fitting(512, 512) >= fitting(1024, 1024)
    assert AutoBatchSize([model], low_memory=True)(256, 256) == 1
    for method in ("advdm+", "mist"):
        assert fitting(256, 256, method=method) < fitting(256, 256)
        assert AutoBatchSize([model], method=method)(256, 256) == fitting(256, 256, method=method)


def test_what_a_step_through_the_unet_keeps_is_measured_with_the_unet(one_thread):
    """AdvDM and Mist keep the UNet's activations as well as the encoder's."""
    model = tiny_model()
    encoder_only, through_unet = (saved_bytes_per_pixel(model, flag) for flag in (False, True))
    x = (bench_images(1, 64, seed=8) * 2 - 1).requires_grad_(True)
    cond = model.condition("", 1, 64, 64)
    t = torch.tensor([500])
    kept = saved_tensor_bytes(lambda: model.predict_noise(model.encode(x), t, cond))
    assert through_unet > encoder_only
    assert kept == pytest.approx(through_unet * 64 * 64, rel=0.25)


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
    variants = (("plain", []), ("lean", ["--low-memory"]), ("graphs", ["--cuda-graphs"]))
    for name, flags in variants:  # --cuda-graphs: accepted, and a no-op off CUDA
        out = tmp_path / name
        args = ["protect", str(image), "-o", str(out), "--model", str(tiny_model_dir)]
        args += ["--device", "cpu", "--dtype", "fp32", "--steps", "2", "--method", "mist", *flags]
        result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        outputs[name] = np.asarray(Image.open(out / "in.png"))
    np.testing.assert_array_equal(outputs["lean"], outputs["plain"])
    np.testing.assert_array_equal(outputs["graphs"], outputs["plain"])


@pytest.mark.parametrize("amx", [True, False])
def test_convolutions_take_the_layout_measured_faster(tiny_model_dir, amx, monkeypatch):
    """NHWC on CPUs with AMX, NCHW on others (BENCHMARKS.md), through the real loader; GPUs
    keep NCHW until the bench says otherwise."""
    from mimicshield.models import convolution_layout, load_models

    monkeypatch.setattr("mimicshield.models._cpu_has_amx", lambda: amx)
    model = load_models(str(tiny_model_dir), device="cpu", dtype="fp32")
    for conv in (model.vae.encoder.conv_in, model.unet.conv_in):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) is amx
        assert conv.weight.is_contiguous() is not amx  # really NHWC, not a 1x1 coincidence
    assert convolution_layout(torch.device("cuda")) == torch.contiguous_format
