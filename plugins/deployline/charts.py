"""Small inline SVG charts for the metrics page: no JavaScript, no assets to serve."""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT, PAD = 720, 180, 30
BLUE, RED, GREY = "#017cee", "#d9534f", "#6c757d"


def _svg(body: str, height: int = HEIGHT, label: str = "") -> str:
    return (f'<svg viewBox="0 0 {WIDTH} {height}" width="100%" role="img" aria-label="{escape(label)}" '
            f'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="11">{body}</svg>')


def daily_bars(daily: list[dict]) -> str:
    """Deploys per day (blue), the failed ones stacked on top (red)."""
    if not daily:
        return ""
    top = max([d["deploys"] for d in daily] + [1])
    slot = (WIDTH - 2 * PAD) / len(daily)
    scale = (HEIGHT - 2 * PAD) / top
    parts = [f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="{GREY}"/>',
             f'<text x="{PAD - 4}" y="{PAD + 4}" text-anchor="end">{top}</text>',
             f'<text x="{PAD - 4}" y="{HEIGHT - PAD}" text-anchor="end">0</text>']
    for i, day in enumerate(daily):
        x = PAD + i * slot + slot * 0.15
        good = day["deploys"] - day["failed"]
        y = HEIGHT - PAD
        for count, colour in ((good, BLUE), (day["failed"], RED)):
            if count:
                parts.append(f'<rect x="{x:.1f}" y="{y - count * scale:.1f}" width="{slot * 0.7:.1f}" '
                             f'height="{count * scale:.1f}" fill="{colour}"><title>{escape(day["date"])}: '
                             f'{day["deploys"]} deploy(s), {day["failed"]} failed</title></rect>')
                y -= count * scale
    for i in sorted({0, len(daily) // 2, len(daily) - 1}):
        parts.append(f'<text x="{PAD + (i + 0.5) * slot:.1f}" y="{HEIGHT - PAD + 14}" text-anchor="middle">'
                     f'{escape(daily[i]["date"])}</text>')
    return _svg("".join(parts), label="deploys per day")


def stage_durations(stages: dict[str, dict]) -> str:
    """Horizontal bars: each stage's median seconds, with its p90 as a thin line."""
    rows = [(name, s["seconds"]) for name, s in stages.items() if s["seconds"]["count"]]
    if not rows:
        return ""
    top = max(r[1]["p90"] for r in rows) or 1
    left, row = 140, 24
    height = PAD + row * len(rows)
    scale = (WIDTH - left - 90) / top
    parts = []
    for i, (name, seconds) in enumerate(rows):
        y = 10 + i * row
        median_w, p90_x = seconds["median"] * scale, left + seconds["p90"] * scale
        parts.append(
            f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{escape(name)}</text>'
            f'<rect x="{left}" y="{y}" width="{max(median_w, 1):.1f}" height="16" fill="{BLUE}">'
            f'<title>{escape(name)}: median {seconds["median"]:.1f} s, p90 {seconds["p90"]:.1f} s, '
            f'{seconds["count"]} run(s)</title></rect>'
            f'<line x1="{p90_x:.1f}" y1="{y}" x2="{p90_x:.1f}" y2="{y + 16}" stroke="{RED}" stroke-width="2"/>'
            f'<text x="{p90_x + 6:.1f}" y="{y + 13}">{_duration(seconds["median"])} / {_duration(seconds["p90"])}'
            f'</text>')
    return _svg("".join(parts), height=height, label="stage durations")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
