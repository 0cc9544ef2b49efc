"""The site's figures as SVG text (matplotlib), ready to inline into a page.

Text stays text (`svg.fonttype: none`, drawn in the page's own font) and the
output carries no date and a fixed hash salt, so regenerating an unchanged
leaderboard gives byte-identical pages.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

_RC = {"svg.fonttype": "none", "svg.hashsalt": "adt-ft-site", "font.size": 9.0}
_MARKERS = "osD^vP*X<>"
_COLORS = ("#1f5fbf", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#5c940d", "#0b7285", "#e67700",
           "#495057", "#a61e4d")


@dataclass
class Point:
    label: str
    clean: float
    robust: float
    href: str
    series: str          # the legend entry (a comparability group: ε, n)


@dataclass
class Bar:
    label: str
    value: float | None
    before: float | None = None   # the base model's value, when the entry has a baseline
    cumulative: bool = False


def _svg_text(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": "adt-ft"})
    text = buf.getvalue()
    # Inline SVG starts at the <svg> element: no XML prolog or DOCTYPE inside an HTML page.
    return text[text.index("<svg"):]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


# Where a label may sit beside its point, in points (x, y) and alignment, nearest first.
_LABEL_SPOTS = [((5, 3), "left", "bottom"), ((5, -3), "left", "top"), ((-5, 3), "right", "bottom"),
                ((-5, -3), "right", "top"), ((0, 7), "center", "bottom"), ((0, -7), "center", "top"),
                ((12, 10), "left", "bottom"), ((-12, -10), "right", "top"), ((12, -10), "left", "top"),
                ((-12, 10), "right", "bottom"), ((0, 16), "center", "bottom"), ((0, -16), "center", "top")]


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _place_labels(fig, ax, points: Sequence[Point]) -> None:
    """Label each point where the label stays inside the axes and overlaps no other label or point
    (the nearest free spot of `_LABEL_SPOTS`); a point with no free spot stays unlabelled rather than
    covered (its marker still links to its page and the table names it)."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform((p.clean, p.robust)) for p in points]
    taken = [Bbox.from_extents(x - 3, y - 3, x + 3, y + 3) for x, y in dots]
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer))
    # Crowded points first: they have the fewest free spots.
    order = sorted(range(len(points)), key=lambda i: -sum(abs(dots[i][0] - x) + abs(dots[i][1] - y) < 60
                                                           for x, y in dots))
    for i in order:
        p = points[i]
        for offset, ha, va in _LABEL_SPOTS:
            text = ax.annotate(p.label, (p.clean, p.robust), fontsize=6.5, xytext=offset, textcoords="offset points",
                               ha=ha, va=va, color="#333333", annotation_clip=True)
            box = text.get_window_extent(renderer).expanded(1.04, 1.1)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(_overlaps(box, t) for t in taken):
                taken.append(box)
                text.set_gid(f"point-label-{i}")  # the browser test finds the labels by this id
                break
            text.remove()


def scatter_svg(points: Sequence[Point]) -> str | None:
    """Clean vs robust accuracy, one marker and colour per series; each point links to its entry page."""
    points = [p for p in points if p.clean is not None and p.robust is not None]
    if not points:
        return None
    matplotlib, plt = _pyplot()
    series = list(dict.fromkeys(p.series for p in points))
    with matplotlib.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(7.2, 4.6))
        for i, name in enumerate(series):
            mine = [p for p in points if p.series == name]
            sc = ax.scatter([p.clean for p in mine], [p.robust for p in mine], marker=_MARKERS[i % len(_MARKERS)],
                            color=_COLORS[i % len(_COLORS)], s=36, label=name, zorder=3)
            sc.set_urls([p.href for p in mine])
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel("robust accuracy (%): A_rob, else AutoAttack")
        ax.grid(alpha=0.3, zorder=0)
        ax.margins(0.08, 0.1)
        ax.patch.set_gid("plot-frame")
        if len(series) > 1 or series[0]:
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        _place_labels(fig, ax, points)
        text = _svg_text(fig)
        plt.close(fig)
    return text


def bars_svg(bars: Sequence[Bar]) -> str | None:
    """Accuracy per attack (and clean, A_rob); paired with the base model's bars when there is a baseline."""
    bars = list(bars)
    if not any(b.value is not None for b in bars):
        return None
    matplotlib, plt = _pyplot()
    paired = any(b.before is not None for b in bars)
    width = 0.4 if paired else 0.7
    xs = list(range(len(bars)))
    with matplotlib.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(max(4.5, 0.75 * len(bars) + 1.5), 3.3))
        after_x = [x + width / 2 for x in xs] if paired else xs
        if paired:
            ax.bar([x - width / 2 for x in xs], [b.before or 0.0 for b in bars], width=width, color="#adb5bd",
                   label="before (base model)", zorder=3)
        rects = ax.bar(after_x, [b.value or 0.0 for b in bars], width=width, color=_COLORS[0],
                       label="after" if paired else None, zorder=3)
        for rect, b in zip(rects, bars):
            if b.cumulative:  # cascade columns count survivors of every earlier attack too
                rect.set_hatch("//")
                rect.set_edgecolor("white")
            ax.annotate("—" if b.value is None else f"{b.value:.1f}", (rect.get_x() + rect.get_width() / 2,
                        rect.get_height()), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
        ax.set_xticks(xs)
        ax.set_xticklabels([b.label for b in bars], rotation=30, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, max(100.0, *[(b.value or 0.0) for b in bars]) * 1.08)
        ax.grid(axis="y", alpha=0.3, zorder=0)
        if paired:
            ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        text = _svg_text(fig)
        plt.close(fig)
    return text
