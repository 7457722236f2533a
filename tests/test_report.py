"""The HTML report: infinite values in tables and plots, and a real headless Chromium load."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import CHROMIUM, CHROMIUM_ARGS

from mimicshield.evaluation import CLEAN, EvaluationResult, Gallery, ImageRow, Record
from mimicshield.mimicry import Variant
from mimicshield.report import (
    Series,
    format_value,
    line_plot_svg,
    render_report,
    thumbnail,
    write_report,
)


def check_in_chromium(path: Path) -> None:
    """Open ``path`` in headless Chromium: no console error, every image decoded."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright Python package is not installed"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on(
                "console",
                lambda m: (
                    problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning")
                    else None
                ),
            )
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])"
            )
            svgs = page.evaluate("document.querySelectorAll('svg.plot').length")
        finally:
            browser.close()
    assert not problems, problems
    assert images, "the report has no images"
    broken = [alt for complete, width, alt in images if not complete or width == 0]
    assert not broken, f"images that did not load: {broken}"
    assert svgs > 0


def _result() -> EvaluationResult:
    """A small result by hand: two methods, SDEdit at two strengths, one TI gallery, infinities."""
    variants = [Variant("sdedit-onestep", s) for s in (0.05, 0.1)]
    variants += [Variant("sdedit-ddim", s) for s in (0.05, 0.1)]
    variants.append(Variant("textual-inversion"))
    result = EvaluationResult(
        model="tiny",
        settings={"seed": 0, "resolution": 32},
        sources=[{"name": n} for n in (CLEAN, "sds-", "copy")],
        variants=variants,
        headline=variants[3],
        notes=["FD note"],
        warnings=["a warning"],
    )
    records = result.records
    for source, psnr in (("sds-", 34.0), ("copy", math.inf)):
        for image in ("a", "b"):
            records.append(Record(source, "imperceptibility", None, image, "psnr", psnr))
            records.append(Record(source, "imperceptibility", None, image, "lpips", 0.01))
    for v in variants[:4]:
        for source, gap in ((CLEAN, 0.0), ("sds-", 0.2), ("copy", 0.0)):
            for image in ("a", "b"):
                psnr = math.inf if gap == 0 else 20 - 30 * v.strength
                add = [
                    ("lpips_vs_clean", 0.3 + gap + v.strength),
                    ("lpips_vs_clean_mimicry", gap),
                    ("psnr_vs_clean_mimicry", psnr),
                ]
                for metric, value in add:
                    records.append(Record(source, v.scenario, v.strength, image, metric, value))
            records.append(Record(source, v.scenario, v.strength, None, "fd_lpips_alexnet", 1.0))
    records.append(Record("sds-", "textual-inversion", None, None, "fid", math.nan))
    image = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))
    uri = thumbnail(image)
    for source in ("sds-", "copy"):
        for key in ("a", "b"):
            result.rows.append(
                ImageRow(source, key, uri, uri, uri, uri, uri, {"psnr": math.inf, "lpips": 0.0})
            )
    result.galleries.append(Gallery(CLEAN, "textual-inversion", [uri, uri]))
    return result


def test_format_value_handles_infinities_and_gaps():
    assert format_value(math.inf, "psnr") == "∞"
    assert format_value(-math.inf, "psnr") == "−∞"
    assert format_value(math.nan, "fid") == "–" and format_value(None) == "–"
    assert format_value(31.234, "psnr_vs_clean", n_inf=1, n=3) == "31.23 (+1×∞)"
    assert format_value(0.12345, "lpips") == "0.1235"


def test_plot_puts_infinite_points_on_a_marked_band():
    svg = line_plot_svg(
        [
            Series("finite", [0.1, 0.2], [30.0, 25.0], "#000"),
            Series("identical", [0.1, 0.2], [math.inf, math.inf], "#f00", dashed=True),
            Series("gaps", [0.1, 0.2], [math.nan, None], "#0f0"),
        ],
        title="PSNR",
    )
    assert svg.startswith("<svg") and svg.endswith("</svg>") and ">∞<" in svg
    numbers = re.findall(r'\s(?:x|y|cx|cy|x1|x2|y1|y2|height)="([^"]+)"', svg)
    numbers += [n for p in re.findall(r'points="([^"]+)"', svg) for n in re.split("[ ,]", p)]
    assert numbers and all(math.isfinite(float(n)) for n in numbers)
    only_inf = line_plot_svg([Series("s", [0.1], [math.inf], "#000")], title="t")
    assert ">∞<" in only_inf


def test_report_tables_show_infinity_and_baseline(tmp_path):
    html = render_report(_result())
    assert "∞" in html and "(+" not in html.split("Imperceptibility")[1].split("</table>")[0]
    assert "clean (no protection)" in html and "textual-inversion" in html
    text = re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", "", html)  # base64 can spell it
    assert "nan" not in text.lower() and "inf<" not in text
    assert html.count('class="best"') > 0
    path = write_report(_result(), tmp_path / "r" / "report.html")
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_report_opens_in_headless_chromium(tmp_path):
    path = write_report(_result(), tmp_path / "report.html")
    check_in_chromium(path)


def test_best_counts_infinite_values_instead_of_dropping_them():
    """Mimicry that matched the clean one on three images of four (PSNR +inf against the clean
    mimicry) is not the best protection because its fourth image scored 20 dB."""
    from mimicshield.evaluation import Record, summarize
    from mimicshield.report import _best

    inf = float("inf")
    records = [
        Record(source, "sdedit-ddim", 0.1, f"img{i}", "psnr_vs_clean_mimicry", value)
        for source, values in {"A": [inf, inf, inf, 20.0], "B": [25.0] * 4}.items()
        for i, value in enumerate(values)
    ]
    summaries = {s.source: s for s in summarize(records)}
    assert summaries["A"].mean == 20.0 and summaries["A"].n_inf == 3  # as the table shows it
    assert _best(summaries, "psnr_vs_clean_mimicry") == {"B"}  # lower is better
    records = [Record("A", "imperceptibility", None, "x", "psnr", inf)]
    records += [Record("B", "imperceptibility", None, "x", "psnr", 40.0)]
    summaries = {s.source: s for s in summarize(records)}
    assert _best(summaries, "psnr") == {"A"}  # an unchanged image is the most imperceptible


def test_an_interrupted_report_or_metrics_write_keeps_the_earlier_files(tmp_path, monkeypatch):
    """Ctrl-C while the report or the metrics are written leaves the earlier run's files whole
    (and no partial files), rather than a truncated file under the final name."""
    import os

    from mimicshield.evaluation import write_metrics

    earlier = {name: f"earlier {name}" for name in ("report.html", "metrics.csv", "metrics.json")}
    for name, text in earlier.items():
        (tmp_path / name).write_text(text)
    flushes, real_fsync = [], os.fsync

    def interrupted_at(count: int):
        def fsync(fd):  # the flush before each rename: the Nth is interrupted
            flushes.append(fd)
            if len(flushes) == count:
                raise KeyboardInterrupt
            return real_fsync(fd)

        return fsync

    monkeypatch.setattr("os.fsync", interrupted_at(1))
    with pytest.raises(KeyboardInterrupt):
        write_report(_result(), tmp_path / "report.html")
    flushes.clear()
    monkeypatch.setattr("os.fsync", interrupted_at(2))  # metrics.csv written, then .json cut
    with pytest.raises(KeyboardInterrupt):
        write_metrics(_result(), tmp_path)
    files = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert files.keys() == earlier.keys()  # no partial files left beside them
    assert files["report.html"] == earlier["report.html"]
    assert files["metrics.json"] == earlier["metrics.json"]
    assert files["metrics.csv"].startswith("source,scenario")  # the one finished before
