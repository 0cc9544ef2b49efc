"""The study's forest plot: each arm's difference to the control with its 95% paired interval."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..utils import atomic_path
from .masking import column_at

if TYPE_CHECKING:
    from .tables import StudyResults


def forest_plot(res: "StudyResults", path: Path) -> None:
    """One panel per scope: each arm's difference to the control (B − A, pp) with its 95% paired
    bootstrap interval, for clean accuracy, A_rob and W-PGD at δ = ε; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..leaderboard.compare import compare_entries

    s = res.spec
    base = res.entry("pointwise", s.base_name)
    measures = [("pointwise", "clean", "clean", "tab:gray"), ("pointwise", "A_rob", "A_rob", "tab:blue")]
    if "w" in res.entries:
        wpgd = column_at(res.entry("w", s.base_name), "wpgd", base.eps)
        measures.append(("w", wpgd, f"W-PGD, δ = {base.eps_label}", "tab:orange"))
    others = [a for a in s.arms if a != s.control]
    fig, axes = plt.subplots(1, len(s.seeds), figsize=(6 * len(s.seeds), 0.6 * len(others) + 2), sharey=True,
                             squeeze=False)
    for ax, (scope, seeds) in zip(axes[0], s.seeds.items()):
        for row, arm in enumerate(others):
            columns = {}  # one comparison per kind of entry, every column of it
            for kind in res.entries:
                comp = compare_entries(res.side(kind, s.control, scope) + res.side(kind, arm, scope),
                                       group_seeds=len(seeds) > 1)[0]
                columns.update({(kind, c.column): c for c in comp.columns})
            for k, (kind, column, label, colour) in enumerate(measures):
                c = columns.get((kind, column))
                if c is None:
                    continue
                y = row + (k - 1) * 0.22
                # A coupled (W-PGD) column has no valid interval: its point only, hollow.
                xerr = None if c.ci is None else [[c.diff - c.ci[0]], [c.ci[1] - c.diff]]
                ax.errorbar(c.diff, y, xerr=xerr, fmt="o", color=colour, capsize=3,
                            mfc="none" if c.ci is None else colour, label=label if row == 0 else None)
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_yticks(range(len(others)), [a.label for a in others])
        ax.set_xlabel(f"difference to {s.control.label} (pp), 95% paired bootstrap interval (W-PGD: none, hollow)")
        ax.set_title(f"scope {scope} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()  # shared: the file's order from the top, in every panel
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
