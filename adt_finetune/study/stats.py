"""Multiple-comparison correction for a study's tables: every p-value a table prints against the
control is one test of a family, so the table also shows Holm's step-down adjustment (it controls the
family-wise error rate under any dependence between the tests, which the columns of one model have)."""
from __future__ import annotations

from typing import Sequence


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values (statsmodels' `multipletests(method="holm")`), None kept in place."""
    from statsmodels.stats.multitest import multipletests

    present = [(i, float(p)) for i, p in enumerate(p_values) if p is not None]
    out: list[float | None] = [None] * len(p_values)
    if present:
        adjusted = multipletests([p for _, p in present], method="holm")[1]
        for (i, _), a in zip(present, adjusted):
            out[i] = float(a)
    return out
