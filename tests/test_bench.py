"""``mimicshield bench``: structure of its output and the reference step's semantics.

Smoke tests on the tiny architecture: they prove the plumbing, never the figures (no timing
assertions; the figures come from the full-size architecture, see BENCHMARKS.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mimicshield.bench import (
    BenchResult,
    BenchSettings,
    _measure,
    add_ratios,
    architecture,
    bench_images,
    build_reference_model,
    markdown_table,
    reference_step,
    targets_table,
)
from mimicshield.cli.main import app
from mimicshield.targets import target_pattern

RESULT_KEYS = {
    "method",
    "variant",
    "dtype",
    "batch",
    "low_memory",
    "compiled",
    "channels_last",
    "channels_first",
    "cuda_graphs",
    "fused_norm",
    "nondeterministic",
    "step_ms",
    "step_cpu_ms",
    "cpu_ms_per_step",
    "cpu_time_speedup_vs_reference",
    "cpu_time_overhead_vs_floor",
    "ms_per_step",
    "ms_min_step",
    "ms_per_image_step",
    "s_per_image_100_steps",
    "first_step_s",
    "compile_s",
    "peak_memory_bytes",
    "memory_kind",
    "speedup_vs_reference",
    "memory_ratio_vs_reference",
    "overhead_vs_floor",
    "error",
}


def test_bench_cli_writes_json_with_every_configuration(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    args = ["bench", "--tiny", "--res", "32", "--device", "cpu", "--steps", "2", "--warmup", "1"]
    args += ["--methods", "sds-,advdm+", "--batch", "1,2", "--json-out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    report = json.loads(out.read_text())
    assert report["settings"]["architecture"] == "tiny"
    assert report["settings"]["batches"] == [1, 2]
    for key in ("date", "device", "device_name", "torch", "diffusers", "attention", "command"):
        assert report["environment"][key]
    assert report["environment"]["attention"] == ["AttnProcessor2_0"]  # SDPA, diffusers' default

    rows = {(r["method"], r["variant"], r["batch"]): r for r in report["results"]}
    expected = {(m, "engine", b) for m in ("sds-", "advdm+") for b in (1, 2)}
    expected |= {("sds-", "floor", 1), ("sds-", "floor", 2)}
    expected |= {("sds-", "reference", 1), ("advdm+", "reference", 1)}
    assert set(rows) == expected
    for row in report["results"]:
        assert set(row) == RESULT_KEYS
        assert row["error"] is None
        assert len(row["step_ms"]) == 2
        assert all(ms > 0 for ms in row["step_ms"])
        assert row["ms_per_step"] > 0 and row["s_per_image_100_steps"] > 0
        assert row["ms_per_image_step"] == pytest.approx(row["ms_per_step"] / row["batch"])
        assert len(row["step_cpu_ms"]) == 2 and row["cpu_ms_per_step"] > 0  # CPU devices only
    for method in ("sds-", "advdm+"):
        assert rows[(method, "reference", 1)]["dtype"] == "fp32"
        for batch in (1, 2):
            assert rows[(method, "engine", batch)]["speedup_vs_reference"] > 0
    assert rows[("sds-", "engine", 1)]["overhead_vs_floor"] > 0
    assert rows[("sds-", "engine", 1)]["cpu_time_overhead_vs_floor"] > 0
    assert rows[("sds-", "engine", 2)]["cpu_time_speedup_vs_reference"] > 0
    assert rows[("advdm+", "engine", 1)]["overhead_vs_floor"] is None  # the floor is SDS's
    assert "x faster" in result.output


def test_bench_sets_each_method_up_as_protect_does(tmp_path, one_thread):
    """--low-memory and --channels-last reach every method's row, each set up for its method."""
    out = tmp_path / "bench.json"
    args = ["bench", "--tiny", "--res", "32", "--device", "cpu", "--steps", "1", "--warmup", "0"]
    args += ["--methods", "sds-,advdm+,photoguard", "--low-memory", "--channels-last"]
    args += ["--no-reference", "--no-floor", "--json-out", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert sorted(row["method"] for row in rows) == ["advdm+", "photoguard", "sds-"]
    for row in rows:
        assert row["error"] is None and row["low_memory"] and row["channels_last"]
    assert "engine low-mem NHWC" in result.output


def test_option_rows_are_labelled_and_compared_with_their_own_floor(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    args = ["bench", "--tiny", "--res", "32", "--device", "cpu", "--steps", "1", "--warmup", "0"]
    args += ["--methods", "sds-", "--nondeterministic", "--fused-norm", "--no-reference"]
    args += ["--json-out", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["settings"]["deterministic"] is False
    rows = {row["variant"]: row for row in report["results"]}
    assert set(rows) == {"engine", "floor"}
    assert all(row["nondeterministic"] and row["error"] is None for row in rows.values())
    assert all(row["fused_norm"] for row in rows.values())
    assert rows["engine"]["overhead_vs_floor"] > 0
    assert "engine GN+SiLU nondet" in result.output


def test_bench_rejects_bad_settings():
    with pytest.raises(ValueError, match="multiple of 64"):
        BenchSettings(res=100)
    with pytest.raises(ValueError, match="Unknown method"):
        BenchSettings(methods=("sds", "nope"))
    with pytest.raises(ValueError, match="dtype"):
        BenchSettings(dtypes=("fp8",))
    with pytest.raises(ValueError, match="exclude each other"):
        BenchSettings(channels_last=True, channels_first=True)
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        BenchSettings(threads=0)
    result = CliRunner().invoke(app, ["bench", "--tiny", "--res", "30"])
    assert result.exit_code != 0


def test_a_json_out_that_is_a_folder_fails_before_any_timing(tmp_path, monkeypatch):
    from mimicshield.cli.errors import CLIError

    monkeypatch.setattr("mimicshield.bench.run_bench", lambda *a, **k: pytest.fail("timed"))
    result = CliRunner().invoke(app, ["bench", "--tiny", "--json-out", str(tmp_path)])
    assert isinstance(result.exception, CLIError) and "is a folder" in str(result.exception)


def test_a_failing_configuration_is_recorded_not_raised():
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    result = _measure(
        BenchResult("mist", "engine", "bf16", 8), torch.device("cpu"), None, out_of_memory
    )
    assert result.error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert result.ms_per_step is None
    add_ratios([result])  # failed rows get no ratios, and do not break the others


def test_ratios_compare_per_image_and_memory_at_batch_one():
    reference = BenchResult("sds-", "reference", "fp32", 1, step_ms=[100.0], peak_memory_bytes=8)
    engine_1 = BenchResult("sds-", "engine", "bf16", 1, step_ms=[20.0], peak_memory_bytes=2)
    engine_8 = BenchResult("sds-", "engine", "bf16", 8, step_ms=[80.0], peak_memory_bytes=16)
    floor_1 = BenchResult("sds-", "floor", "bf16", 1, step_ms=[16.0])
    add_ratios([reference, engine_1, engine_8, floor_1])
    assert engine_1.speedup_vs_reference == pytest.approx(5.0)
    assert engine_1.memory_ratio_vs_reference == pytest.approx(4.0)
    assert engine_1.overhead_vs_floor == pytest.approx(1.25)
    assert engine_8.speedup_vs_reference == pytest.approx(10.0)  # 10 ms per image-step
    assert engine_8.memory_ratio_vs_reference is None
    assert engine_8.s_per_image_100_steps == pytest.approx(1.0)


@pytest.fixture(scope="module")
def reference_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_reference_model(architecture(tiny=True), torch.device("cpu"))
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["sds-", "sdst-", "advdm+", "mist", "photoguard", "encoder"])
def test_reference_step_computes_what_the_reference_does(reference_model, method):
    """A sign step inside the budget; UNet weight gradients exactly where the reference has them."""
    ref = reference_model
    ref.unet.zero_grad(set_to_none=True)
    assert ref.unet.is_gradient_checkpointing
    assert all(p.requires_grad for p in ref.unet.parameters())
    assert ref.vae.decoder is not None  # ldm keeps the whole first stage loaded

    x0 = bench_images(1, 32, seed=0) * 2 - 1
    target = target_pattern(32, 32)[None] * 2 - 1
    x = reference_step(ref, method, x0, x0, target)
    assert x.shape == x0.shape
    assert (x - x0).abs().max() <= 32 / 255 + 1e-6
    assert (x != x0).any()

    weight_grads = [p.grad for p in ref.unet.parameters() if p.grad is not None]
    if method in ("advdm+", "mist"):
        assert weight_grads and any(g.abs().sum() > 0 for g in weight_grads)
    elif method in ("sds-", "sdst-"):
        assert not weight_grads  # the SDS loop runs the UNet under no_grad


def test_markdown_table_recomputes_ratios_across_reports():
    """A --low-memory run gets its ratios from the reference that another invocation measured."""
    reference = BenchResult("sds-", "reference", "fp32", 1, step_ms=[60.0], peak_memory_bytes=6)
    lean = BenchResult("sds-", "engine", "bf16", 1, low_memory=True, step_ms=[30.0])
    lean.peak_memory_bytes, lean.memory_kind = 2 * 2**30, "cuda_max_allocated"
    failed = BenchResult("mist", "engine", "bf16", 8, error="OutOfMemoryError: out of memory")
    reports = [{"results": [reference.to_dict()]}, {"results": [lean.to_dict(), failed.to_dict()]}]
    table = markdown_table(reports).splitlines()
    assert len(table) == 2 + 3
    assert "| sds- | engine low-mem | bf16 | 1 | 30.0 | 30.0 | 3.00 | 2.00 | 2.00 |" in table[3]
    assert "failed: OutOfMemoryError" in table[4]


@pytest.mark.slow
def test_full_size_bench_at_128_px_on_the_cpu(tmp_path):
    """The issue's CPU smoke test: the real SD 1.x architecture (random weights), 128 px, one
    step of each variant. About a minute on 2 cores; it asserts structure, never speed."""
    out = tmp_path / "bench.json"
    args = ["bench", "--device", "cpu", "--res", "128", "--methods", "sds-"]
    args += ["--steps", "1", "--warmup", "0", "--json-out", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["settings"]["architecture"] == "sd1" and report["settings"]["res"] == 128
    rows = {row["variant"]: row for row in report["results"]}
    assert set(rows) == {"engine", "floor", "reference"}
    assert all(row["error"] is None and len(row["step_ms"]) == 1 for row in rows.values())
    assert rows["reference"]["dtype"] == "fp32"
    engine = rows["engine"]
    assert engine["speedup_vs_reference"] > 0 and engine["overhead_vs_floor"] > 0
    assert engine["memory_ratio_vs_reference"] > 0


def test_targets_table_reads_the_closest_row_for_each_target():
    def row(batch, ms, peak_gib=None, **flags):
        result = BenchResult("sds-", "engine", "bf16", batch, step_ms=[ms], **flags)
        if peak_gib is not None:
            result.peak_memory_bytes = int(peak_gib * 2**30)
            result.memory_kind = "cuda_max_allocated"
        return result.to_dict()

    reference = BenchResult("sds-", "reference", "fp32", 1, step_ms=[100.0])
    reference.peak_memory_bytes, reference.memory_kind = 7 * 2**30, "cuda_max_allocated"
    floor = BenchResult("sds-", "floor", "bf16", 1, step_ms=[20.0]).to_dict()
    rows = [
        row(1, 30.0, 2.8),
        row(1, 24.0, 2.9, cuda_graphs=True),
        row(8, 96.0),  # 12 ms per image-step
        row(1, 50.0, 2.2, low_memory=True),
        reference.to_dict(),
        floor,
    ]
    table = dict(
        (line.split(" | ")[0].strip("| "), line.split(" | ")[1:])
        for line in targets_table([{"results": rows}]).splitlines()[2:]
    )
    assert table["batched: at most 10 ms per image-step"] == [
        "engine, bf16, batch 8",
        "12.00",
        "no |",
    ]
    assert table["one image: at most 25 ms per step"] == [
        "engine graphs, bf16, batch 1",
        "24.00",
        "yes |",
    ]
    assert table["peak GPU memory at batch 1: at most 3.0 GiB"][1:] == ["2.80", "yes |"]
    assert table["--low-memory peak: at most 2.0 GiB"][1:] == ["2.20", "no |"]
    assert table["at least 5x faster than the reference"][1:] == ["8.33", "yes |"]  # 100 / 12
    # the floor ratio shows the worst row: 30 ms against the 20 ms floor
    assert table["engine within 1.2x of the bare networks (worst row)"][1:] == ["1.50", "no |"]
