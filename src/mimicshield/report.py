"""A self-contained HTML report: tables, inline SVG plots and base64-embedded images.

One file that opens anywhere, offline, with no script and no external resource. Plots are SVG
written here (no plotting dependency); infinite values (PSNR of identical images) are drawn on
a band marked ∞ above the plot, and shown as ∞ in tables.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor

from .evaluation import CLEAN, METRICS, EvaluationResult, Summary, summarize
from .images import write_text_atomically

__all__ = ["Series", "format_value", "line_plot_svg", "render_report", "thumbnail", "write_report"]

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
SDEDIT = ("sdedit-onestep", "sdedit-ddim")
_DECIMALS = {"psnr": 2, "ssim": 4, "lpips": 4, "linf_255": 1, "clip": 4, "fid": 2}


def thumbnail(image: Tensor, max_side: int = 256, quality: int = 90) -> str:
    """A (3, H, W) image in [0, 1] as a JPEG data URI, downscaled to at most ``max_side``."""
    from .images import to_pil

    image = image.detach().float().cpu()
    _, height, width = image.shape
    scale = max_side / max(height, width)
    if scale < 1:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
    buffer = io.BytesIO()
    to_pil(image.clamp(0, 1)).save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def format_value(value: float | None, metric: str = "", n_inf: int = 0, n: int = 0) -> str:
    """A table cell: ∞ for infinite values, – for missing, and a note when some were infinite."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    base = metric.split("_")[0]
    decimals = (
        3 if metric in ("precision", "recall", "fd_lpips_alexnet") else _DECIMALS.get(base, 3)
    )
    text = f"{value:.{decimals}f}"
    if n_inf:
        text += f" (+{n_inf}×∞)" if n_inf < n else ""
    return text


# --- SVG plots ---------------------------------------------------------------------------------


@dataclass
class Series:
    name: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str
    dashed: bool = False


def _nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [low, high]."""
    if high <= low:
        high = low + (abs(low) or 1.0) * 0.1
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _swatch(x: float, y: float, s: Series) -> str:
    dash = ' stroke-dasharray="5 3"' if s.dashed else ""
    return (
        f'<line x1="{x}" x2="{x + 16}" y1="{y}" y2="{y}" stroke="{s.color}" '
        f'stroke-width="2"{dash}/>'
    )


def line_plot_svg(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str = "SDEdit strength",
    y_label: str = "",
    width: int = 300,
    height: int = 200,
    legend: bool = True,
) -> str:
    """An inline SVG line chart. +inf points sit on a band labelled ∞ above the axes, -inf on
    one below; NaN and None points are left out. The legend, if any, goes under the chart."""
    esc = html.escape
    left, right, top = 48, 10, 40
    inner_w, inner_h = width - left - right, height - top - 36
    xs = sorted({x for s in series for x in s.xs})
    values = [y for s in series for y in s.ys if y is not None]
    finite = [y for y in values if math.isfinite(y)]
    neg_inf = any(y == -math.inf for y in values)
    ticks = _nice_ticks(min(finite), max(finite)) if finite else [0.0, 1.0]
    y_low, y_high = ticks[0], ticks[-1]
    x_low, x_high = (xs[0], xs[-1]) if xs else (0.0, 1.0)
    if x_high == x_low:
        x_low, x_high = x_low - 0.5, x_high + 0.5
    bottom = top + inner_h + (14 if neg_inf else 0)  # the x-axis labels start below this

    def px(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * inner_w

    def py(y: float) -> float:
        if y == math.inf:
            return top - 16
        if y == -math.inf:
            return top + inner_h + 14
        return top + (1 - (y - y_low) / (y_high - y_low)) * inner_h

    body = [
        f'<text x="{width / 2}" y="13" text-anchor="middle" class="title">{esc(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{inner_w}" height="{inner_h}" class="frame"/>',
    ]
    for tick in ticks:
        y = py(tick)
        body.append(
            f'<line x1="{left}" x2="{left + inner_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
        )
        body.append(f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">{tick:g}</text>')
    for bound, label in ((math.inf, "∞"), (-math.inf, "−∞")):
        if bound in values:
            y = py(bound)
            body.append(f'<line x1="{left}" x2="{left + inner_w}" y1="{y}" y2="{y}" class="inf"/>')
            body.append(f'<text x="{left - 4}" y="{y + 3}" text-anchor="end">{label}</text>')
    for x in xs:
        body.append(f'<text x="{px(x):.1f}" y="{bottom + 13}" text-anchor="middle">{x:g}</text>')
    body.append(
        f'<text x="{left + inner_w / 2}" y="{bottom + 28}" text-anchor="middle">'
        f"{esc(x_label)}</text>"
    )
    if y_label:
        body.append(
            f'<text transform="translate(11 {top + inner_h / 2}) rotate(-90)" '
            f'text-anchor="middle">{esc(y_label)}</text>'
        )
    for s in series:
        points = [
            (px(x), py(y), x, y)
            for x, y in zip(s.xs, s.ys, strict=True)
            if y is not None and not math.isnan(y)
        ]
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        if len(points) > 1:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b, _, _ in points)
            body.append(
                f'<polyline points="{path}" fill="none" stroke="{s.color}" '
                f'stroke-width="1.6"{dash}/>'
            )
        for a, b, x, y in points:
            body.append(
                f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.6" fill="{s.color}">'
                f"<title>{esc(s.name)}: {x:g} → {format_value(y)}</title></circle>"
            )
    total_height = bottom + 36
    if legend:
        x, y = left, bottom + 46
        for s in series:
            item_width = 24 + 6 * len(s.name)
            if x > left and x + item_width > width:
                x, y = left, y + 14
            body.append(_swatch(x, y - 4, s))
            body.append(f'<text x="{x + 19}" y="{y}">{esc(s.name)}</text>')
            x += item_width
        total_height = y + 8
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" '
        f'height="{total_height:.0f}" role="img" aria-label="{esc(title)}">{"".join(body)}</svg>'
    )


def legend_html(series: Sequence[Series]) -> str:
    """A legend shared by a row of plots drawn with ``legend=False``."""
    items = "".join(
        f'<span><svg width="18" height="8">{_swatch(1, 4, s)}</svg> {html.escape(s.name)}</span>'
        for s in series
    )
    return f'<div class="legend">{items}</div>'


# --- the page ----------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1400px; color: #222;
       padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin-top: 20px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #f4f4f4; } td.name, th.name, table.images th:first-child { text-align: left; }
td.best { font-weight: 700; background: #eaf5ea; }
tr.baseline td { color: #666; font-style: italic; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; margin: 6px 0; }
.warn { background: #fdecea; border-left: 4px solid #d62728; padding: 6px 10px; margin: 6px 0; }
.plots { display: flex; flex-wrap: wrap; gap: 8px; }
svg.plot text { font: 10px system-ui, sans-serif; fill: #333; }
svg.plot text.title { font-size: 12px; font-weight: 600; }
svg.plot .frame { fill: none; stroke: #999; } svg.plot .grid { stroke: #eee; }
svg.plot .inf { stroke: #bbb; stroke-dasharray: 2 2; }
table.images td { text-align: center; vertical-align: top; }
table.images img { width: 160px; height: auto; display: block; margin: auto; }
.gallery img { width: 160px; height: auto; }
.legend { display: flex; gap: 18px; font-size: 12px; margin: 4px 0; }
.caption { font-size: 11px; color: #555; }
.gallery { display: flex; flex-wrap: wrap; gap: 6px; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _arrow(metric: str) -> str:
    info = METRICS.get(metric)
    return "" if info is None else (" ↑" if info.higher_is_better else " ↓")


def _summary_index(result: EvaluationResult) -> dict[tuple, Summary]:
    return {(s.source, s.scenario, s.strength, s.metric): s for s in summarize(result.records)}


def _best(summaries: dict[str, Summary], metric: str) -> set[str]:
    """The sources with the best value for ``metric`` (ties all marked).

    Infinite values count (a source whose mimicry matched the clean one on three images of
    four, PSNR +inf, is not the best protection for its fourth): see ``Summary.rank_key``.
    """
    usable = {k: s.rank_key() for k, s in summaries.items() if not math.isnan(s.mean)}
    if not usable or metric not in METRICS:
        return set()
    pick = max if METRICS[metric].higher_is_better else min
    best = pick(usable.values())
    return {k for k, v in usable.items() if v == best}


def _table(
    result: EvaluationResult,
    index: dict[tuple, Summary],
    scenario: str,
    strength: float | None,
    sources: Sequence[str],
    metrics: Sequence[str],
) -> str:
    """Rows = sources, columns = metrics grouped as in METRICS; best method per column in bold."""
    groups: dict[str, list[str]] = {}
    for metric in metrics:
        groups.setdefault(METRICS[metric].group, []).append(metric)
    head_top = '<th class="name" rowspan="2">method</th>' + "".join(
        f'<th colspan="{len(names)}">{html.escape(group)}</th>' for group, names in groups.items()
    )
    head = "".join(
        f"<th>{html.escape(METRICS[m].label)}{_arrow(m)}</th>"
        for names in groups.values()
        for m in names
    )
    columns = [m for names in groups.values() for m in names]
    best = {
        m: _best(
            {
                s: index[(s, scenario, strength, m)]
                for s in sources
                if s != CLEAN and (s, scenario, strength, m) in index
            },
            m,
        )
        for m in columns
    }
    body = []
    for source in sources:
        cells = []
        for m in columns:
            summary = index.get((source, scenario, strength, m))
            if summary is None:
                cells.append("<td>–</td>")
                continue
            text = format_value(summary.mean, m, summary.n_inf, summary.n)
            compared = sum(s != CLEAN for s in sources) > 1
            css = ' class="best"' if compared and source in best[m] else ""
            cells.append(f"<td{css}>{html.escape(text)}</td>")
        css = ' class="baseline"' if source == CLEAN else ""
        label = "clean (no protection)" if source == CLEAN else source
        body.append(f'<tr{css}><td class="name">{html.escape(label)}</td>{"".join(cells)}</tr>')
    return (
        f"<table><thead><tr>{head_top}</tr><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


SURVIVING_METRIC = "surviving_latent_distortion"  # written by ``evaluate --purify``


def _surviving_table(index: dict[tuple, Summary]) -> str:
    """Rows = protected sources, columns = purifications: mean surviving latent distortion."""
    cells = {
        (source, scenario.removeprefix("purify-")): summary.mean
        for (source, scenario, _, metric), summary in index.items()
        if metric == SURVIVING_METRIC
    }
    if not cells:
        return ""
    sources = list(dict.fromkeys(source for source, _ in cells))
    purifications = list(dict.fromkeys(name for _, name in cells))
    head = "".join(f"<th>{html.escape(name)}</th>" for name in purifications)
    body = []
    for source in sources:
        row = "".join(
            f"<td>{cells[(source, name)]:.2f}</td>" if (source, name) in cells else "<td>–</td>"
            for name in purifications
        )
        body.append(f'<tr><td class="name">{html.escape(source)}</td>{row}</tr>')
    return (
        "<h3>Surviving latent distortion after purification</h3>"
        "<p>‖E(p(x_adv)) − E(p(x0))‖ / ‖E(x_adv) − E(x0)‖ per purification p: 1 means the "
        "perturbation's effect on the latent is intact, 0 that the purification removed it.</p>"
        f'<table><thead><tr><th class="name">method</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _overview(result: EvaluationResult, index: dict[tuple, Summary], sources: Sequence[str]) -> str:
    """The paper-style summary: one column per scenario, its key protection metric per method.

    Paired scenarios: LPIPS between the mimicry of the protected image and the mimicry of the
    clean one (0 = protection changed nothing). Learned concepts: FID, else FD-LPIPS.
    """
    columns = []
    for v in result.variants:
        candidates = ["lpips_vs_clean_mimicry"] if v.paired else ["fid", "fd_lpips_alexnet"]
        for metric in candidates:
            if any((s, v.scenario, v.strength, metric) in index for s in sources):
                columns.append((v, metric))
                break
    if not columns:
        return ""
    head = "".join(
        f"<th>{html.escape(v.label)}<br><small>{html.escape(METRICS[m].label)}{_arrow(m)}"
        "</small></th>"
        for v, m in columns
    )
    compared = sum(s != CLEAN for s in sources) > 1
    body = []
    for source in sources:
        cells = []
        for v, m in columns:
            summary = index.get((source, v.scenario, v.strength, m))
            if summary is None:
                cells.append("<td>–</td>")
                continue
            others = {
                s: index[(s, v.scenario, v.strength, m)]
                for s in sources
                if s != CLEAN and (s, v.scenario, v.strength, m) in index
            }
            best = compared and source in _best(others, m)
            text = format_value(summary.mean, m, summary.n_inf, summary.n)
            attribute = ' class="best"' if best else ""
            cells.append(f"<td{attribute}>{html.escape(text)}</td>")
        css = ' class="baseline"' if source == CLEAN else ""
        label = "clean (no protection)" if source == CLEAN else source
        body.append(f'<tr{css}><td class="name">{html.escape(label)}</td>{"".join(cells)}</tr>')
    return (
        f'<table><thead><tr><th class="name">method</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _metrics_present(index: dict[tuple, Summary], scenario: str, strength) -> list[str]:
    present = {key[3] for key in index if key[1] == scenario and key[2] == strength}
    return [m for m in METRICS if m in present]


def _plots_for(result: EvaluationResult, index: dict[tuple, Summary], source: str) -> str:
    """Every metric against SDEdit strength: one-step and DDIM, with the clean baseline dashed."""
    scenarios = [s for s in SDEDIT if any(v.scenario == s for v in result.variants)]
    if not scenarios:
        return ""
    metrics = [
        m
        for m in METRICS
        if METRICS[m].group != "imperceptibility"
        and any(key[3] == m and key[1] in scenarios for key in index)
    ]
    figures, legend = [], {}
    for metric in metrics:
        series = []
        for i, scenario in enumerate(scenarios):
            strengths = sorted(v.strength for v in result.variants if v.scenario == scenario)
            name = "one-step" if scenario == "sdedit-onestep" else "DDIM"
            baseline = [(CLEAN, True)] if source != CLEAN else []
            for who, dashed in [(source, False), *baseline]:
                values = [index.get((who, scenario, s, metric)) for s in strengths]
                ys = [None if v is None else v.mean for v in values]
                if all(y is None for y in ys):
                    continue
                label = name if who == source else f"{name}, clean (no protection)"
                series.append(Series(label, strengths, ys, COLORS[i], dashed))
                legend.setdefault(label, series[-1])
        if series:
            info = METRICS[metric]
            title = f"{info.label}{_arrow(metric)} {info.group}"
            figures.append(line_plot_svg(series, title=title, y_label=info.label, legend=False))
    return legend_html(list(legend.values())) + f'<div class="plots">{"".join(figures)}</div>'


def _caption(numbers: dict[str, float]) -> str:
    """Two short lines: how visible the perturbation is, and how much the mimicry changed."""
    lines = []
    if "psnr" in numbers:
        lines.append(
            f"protected vs clean: PSNR {format_value(numbers['psnr'], 'psnr')} dB, "
            f"LPIPS {format_value(numbers.get('lpips'), 'lpips')}"
        )
    if "lpips_vs_clean_mimicry" in numbers:
        lines.append(
            "mimicries: LPIPS "
            f"{format_value(numbers['lpips_vs_clean_mimicry'], 'lpips')}, PSNR "
            f"{format_value(numbers.get('psnr_vs_clean_mimicry'), 'psnr')} dB"
        )
    return "<br>".join(html.escape(line) for line in lines)


def _image_rows(result: EvaluationResult, source: str) -> str:
    rows = [r for r in result.rows if r.source == source]
    if not rows:
        return ""
    headline = result.headline.label if result.headline else "no paired scenario"
    head = (
        "<tr><th>image</th><th>clean</th><th>protected</th><th>perturbation ×10</th>"
        f"<th>mimicry of clean<br><small>{html.escape(headline)}</small></th>"
        f"<th>mimicry of protected<br><small>{html.escape(headline)}</small></th></tr>"
    )
    body = []
    for row in rows:

        def img(uri: str | None, alt: str, name: str = row.image) -> str:
            if uri is None:
                return "<td>–</td>"
            return f'<td><img src="{uri}" alt="{html.escape(alt)} {html.escape(name)}"></td>'

        caption = _caption(row.numbers)
        body.append(
            f'<tr><td class="name">{html.escape(row.image)}<div class="caption">'
            f"{caption}</div></td>"
            + img(row.clean, "clean")
            + img(row.protected, "protected")
            + img(row.perturbation, "perturbation")
            + img(row.mimic_clean, "mimicry of clean")
            + img(row.mimic_protected, "mimicry of protected")
            + "</tr>"
        )
    return f'<table class="images"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def render_report(result: EvaluationResult) -> str:
    """The whole page as one string."""
    esc = html.escape
    index = _summary_index(result)
    sources = result.source_names
    methods = [s for s in sources if s != CLEAN]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>mimicshield evaluation</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>mimicshield evaluation</h1>",
        f"<p>Model <code>{esc(result.model)}</code> · {esc(result.created)} · "
        f"{len(result.rows) and len({r.image for r in result.rows})} image(s) · methods: "
        f"{esc(', '.join(methods))}</p>",
        "<p>Arrows give the direction of better <em>protection</em> (mimicry fails more) or, for "
        "imperceptibility, of a less visible perturbation. Means are over finite values; "
        "“+k×∞” counts identical image pairs (PSNR = ∞).</p>",
    ]
    out += [f'<div class="note">{esc(note)}</div>' for note in result.notes]
    out += [f'<div class="warn">{esc(w)}</div>' for w in result.warnings]

    out.append("<h2>Comparison</h2>")
    overview = _overview(result, index, sources)
    if overview:
        out.append("<h3>Overview: how much each scenario's output changes</h3>")
        out.append(overview)
    imperceptibility = _metrics_present(index, "imperceptibility", None)
    if imperceptibility:
        out.append("<h3>Imperceptibility (protected vs clean)</h3>")
        out.append(_table(result, index, "imperceptibility", None, methods, imperceptibility))
    for variant in result.variants:
        metrics = _metrics_present(index, variant.scenario, variant.strength)
        if metrics:
            out.append(f"<h3>{esc(variant.label)}</h3>")
            out.append(_table(result, index, variant.scenario, variant.strength, sources, metrics))
    out.append(_surviving_table(index))

    if any(v.scenario in SDEDIT for v in result.variants):
        out.append("<h2>Metrics against SDEdit strength</h2>")
        for source in sources:
            label = "clean (no protection)" if source == CLEAN else source
            out.append(f"<h3>{esc(label)}</h3>")
            out.append(_plots_for(result, index, source))

    if result.rows:
        out.append("<h2>Images</h2>")
        for source in methods:
            out.append(f"<h3>{esc(source)}</h3>")
            out.append(_image_rows(result, source))

    if result.galleries:
        out.append("<h2>Samples from learned concepts</h2>")
        for gallery in result.galleries:
            label = "clean (no protection)" if gallery.source == CLEAN else gallery.source
            images = "".join(
                f'<img src="{uri}" alt="{esc(gallery.variant)} sample {i} ({esc(label)})">'
                for i, uri in enumerate(gallery.samples)
            )
            out.append(f"<h3>{esc(gallery.variant)} · trained on {esc(label)}</h3>")
            out.append(f'<div class="gallery">{images}</div>')

    out.append("<h2>Settings</h2><table>")
    for key, value in result.settings.items():
        out.append(
            f'<tr><td class="name">{esc(key)}</td><td class="name">{esc(str(value))}</td></tr>'
        )
    out.append("</table></body></html>")
    return "\n".join(out)


def write_report(result: EvaluationResult, path: str | Path) -> Path:
    """Write ``report.html`` (UTF-8); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, render_report(result))
    return path
