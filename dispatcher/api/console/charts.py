"""Inline SVG charts of :class:`dispatcher.store.stats.Series` (no script, no chart library): deliveries per minute
by outcome as stacked bars, latency p50/p99 in milliseconds as lines. Each chart is an ``<svg role="img">`` with
a ``<title>`` and a ``<desc>`` summing it up for screen readers, and a ``<title>`` per bar or point (a tooltip).
Text is escaped; colours are SVG attributes (no inline CSS, which the console's CSP forbids)."""

from __future__ import annotations

from itertools import count

from markupsafe import Markup, escape

from dispatcher.api.console.rendering import ms, when
from dispatcher.store.stats import Series

WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 720, 160, 48, 20, 8
COLOURS = {"succeeded": "#2e7d32", "retrying": "#ef8f00", "failed": "#c62828", "p50": "#1565c0", "p99": "#6a1b9a"}
_ids = count(1)


def _frame(series: Series, title: str, desc: str, body: list[str], y_max: float, y_label: str) -> Markup:
    """The ``<svg>`` around ``body``: title, description, axes, the y maximum and time labels every 6 hours."""
    n = next(_ids)
    plot_h = HEIGHT - BOTTOM - TOP
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="chart{n}t chart{n}d"'
             f' xmlns="http://www.w3.org/2000/svg">',
             f'<title id="chart{n}t">{escape(title)}</title><desc id="chart{n}d">{escape(desc)}</desc>',
             f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="#888"/>',
             f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH}" y2="{TOP + plot_h}" stroke="#888"/>',
             f'<text x="{LEFT - 4}" y="{TOP + 10}" text-anchor="end" font-size="10">{escape(y_label)}</text>',
             f'<text x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end" font-size="10">0</text>']
    step = max(1, 6 * 3600 // series.bucket_s)
    for i in range(0, series.buckets, step):
        x = LEFT + i * _bar_w(series)
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - 4}" font-size="10">'
                     f'{escape(series.bucket_start(i).strftime("%H:%MZ"))}</text>')
    return Markup("".join(parts + body + ["</svg>"]))


def _bar_w(series: Series) -> float:
    return (WIDTH - LEFT) / max(1, series.buckets)


def outcome_chart(series: Series, label: str) -> Markup:
    """Stacked bars of deliveries per minute by outcome, one bar per bucket; ``label`` names what is counted
    (an endpoint, or every endpoint visible)."""
    outcomes = ("succeeded", "retrying", "failed")
    totals = [sum(series.values[o][i] or 0 for o in outcomes) for i in range(series.buckets)]
    y_max = max(totals, default=0) or 1.0
    plot_h, bar_w = HEIGHT - BOTTOM - TOP, _bar_w(series)
    body: list[str] = []
    for i, total in enumerate(totals):
        if not total:
            continue
        y = TOP + plot_h
        tip = ", ".join(f"{o} {series.values[o][i]:.2f}/min" for o in outcomes if series.values[o][i])
        body.append(f"<g><title>{escape(when(series.bucket_start(i)))}: {escape(tip)}</title>")
        for o in outcomes:
            h = (series.values[o][i] or 0) / y_max * plot_h
            if h:
                y -= h
                body.append(f'<rect x="{LEFT + i * bar_w:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                            f'height="{h:.1f}" fill="{COLOURS[o]}"/>')
        body.append("</g>")
    minutes = series.bucket_s / 60
    summary = ", ".join(f"{sum(v or 0 for v in series.values[o]) * minutes:.0f} {o}" for o in outcomes)
    return _frame(series, f"Deliveries per minute by outcome, last 24 h: {label}",
                  f"{summary}; highest {y_max:.2f} per minute", body, y_max, f"{y_max:.1f}/min")


def latency_chart(series: Series, label: str) -> Markup:
    """Lines of latency p50 and p99 (milliseconds) per bucket; a bucket without attempts breaks the line."""
    y_max = max((v for key in ("p50", "p99") for v in series.values[key] if v is not None), default=0) or 1.0
    plot_h, bar_w = HEIGHT - BOTTOM - TOP, _bar_w(series)
    body: list[str] = []
    for key in ("p50", "p99"):
        segment: list[str] = []
        points = [*series.values[key], None]
        for i, v in enumerate(points):
            if v is None:
                if segment:
                    body.append(f'<polyline fill="none" stroke="{COLOURS[key]}" stroke-width="1.5" '
                                f'points="{" ".join(segment)}"/>')
                segment = []
                continue
            x, y = LEFT + (i + 0.5) * bar_w, TOP + plot_h - v / y_max * plot_h
            segment.append(f"{x:.1f},{y:.1f}")
            body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.5" fill="{COLOURS[key]}"><title>'
                        f'{escape(when(series.bucket_start(i)))}: {key} {escape(ms(v))}</title></circle>')
    seen = [v for v in series.values["p99"] if v is not None]
    desc = f"highest p99 {ms(max(seen))}" if seen else "no attempts"
    return _frame(series, f"Latency p50 (blue) and p99 (purple), last 24 h: {label}", desc, body, y_max, ms(y_max))
