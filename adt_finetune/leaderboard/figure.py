"""The leaderboard as a figure: clean vs robust accuracy, and per-attack bars (matplotlib, written atomically)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..errors import UserError
from ..utils import atomic_path
from .entries import Entry
from .render import comparable_groups, rows

_MARKERS = "osD^vP*X<>"


def plot_format(path: str | Path) -> str:
    """The image format a plot path asks for (its suffix; png without one), or a UserError
    listing what matplotlib can write. Check it before any work is done."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    supported = Figure().canvas.get_supported_filetypes()
    if fmt not in supported:
        raise UserError(f"cannot write a plot as .{fmt} ({path}): use one of "
                        f"{', '.join('.' + k for k in sorted(supported))}")
    return fmt


def plot(entries: Iterable[Entry], path: str | Path) -> Path:
    """Clean vs robust accuracy scatter (one marker per comparability group: ε, n) and
    per-attack bars, saved atomically (format from the suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = list(entries)
    fmt = plot_format(path)
    attack_cols, data = rows(entries)
    if not data:
        raise UserError("no leaderboard entries to plot")
    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for g, marker in zip(comparable_groups(entries), _MARKERS * len(entries)):
        points = [(e.clean, e.robust, e.entry) for e in g.entries if e.clean is not None and e.robust is not None]
        if not points:
            continue
        ax1.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=g.title)
        for x, y, name in points:
            ax1.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax1.set_xlabel("clean accuracy (%)")
    ax1.set_ylabel("robust accuracy (%) (A_rob, else AutoAttack)")
    ax1.set_title("clean vs robust")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    cols = ["clean", *attack_cols, "A_rob"]
    width = 0.8 / max(1, len(data))
    for j, r in enumerate(data):
        vals = [r["clean"]] + [r["per_attack"].get(a, r["cumulative"].get(a)) for a in attack_cols] + [r["a_rob"]]
        xs = [i + j * width for i in range(len(cols))]
        ax2.bar(xs, [v if v is not None else 0.0 for v in vals], width=width, label=r["entry"])
    ax2.set_xticks([i + width * (len(data) - 1) / 2 for i in range(len(cols))])
    ax2.set_xticklabels(cols, rotation=45, ha="right")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("per attack")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)
    plt.close(fig)
    return path
