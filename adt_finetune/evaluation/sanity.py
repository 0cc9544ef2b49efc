"""The sanity checks of docs/evaluation.md, "Sanity checks".

Most checks mark a result unreliable and let it be written with a warning. A
model whose weights, buffers or clean logits are not finite gets no result at
all: its argmax is arbitrary (NaN logits pick class 0), so every number computed
from it would be garbage that looks plausible.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from ..errors import UserError
from ..nets import unusable_weights
from .audit_checks import BLACK_BOX_REFERENCE_RATE, black_box_test
from .result import EvalResult, SanityCheck

LINF_TOLERANCE = 1e-6
#: an L2 norm sums thousands of float32 squares: its rounding is larger than one pixel's
L2_TOLERANCE = 1e-5


def _distance_check(result: EvalResult, bounded: list[str]) -> SanityCheck:
    """‖x'−x‖ ≤ ε in the result's threat model (L∞, or L2), for the attack that moved furthest."""
    eps = result.eps
    l2 = result.threat_model == "L2"
    tol, norm = (L2_TOLERANCE, "‖x'−x‖₂") if l2 else (LINF_TOLERANCE, "‖x'−x‖∞")
    worst = max(bounded, key=lambda a: result.max_linf[a])
    d = result.max_linf[worst]
    ok = d <= eps + tol
    # Printed as it is compared: the bound includes the tolerance for float32 rounding, so a distance
    # a hair above ε never reads as "0.0313726 ≤ ε = 0.0313725". Rounding to 7 digits is monotone,
    # so the printed numbers always agree with the verdict.
    bound = f"ε + {tol:g} = {eps + tol:.7g} (ε = {eps:.7g}; the {tol:g} allows for float32 rounding)"
    return SanityCheck("l2" if l2 else "linf", ok, f"max {norm} = {d:.7g} ({worst}) {'≤' if ok else '>'} {bound}"
                       + ("" if ok else ": the attack leaves the threat model, its numbers are invalid"))


def sanity_checks(result: EvalResult, ranges: dict[str, tuple[float, float]],
                  black_box: set[str]) -> list[SanityCheck]:
    """The sanity checks of docs/evaluation.md, "Sanity checks". A failed check marks the result unreliable."""
    checks: list[SanityCheck] = []
    eps = result.eps
    pointwise = [result.attacks[k] for k in result.pointwise]

    bounded = [a for a in result.max_linf if a in pointwise]
    if bounded:
        checks.append(_distance_check(result, bounded))
    # An attack that ran on no example leaves its initial (empty) range: min > max.
    ran = {a: r for a, r in ranges.items() if r[0] <= r[1]}
    if ran:
        lo, hi = min(r[0] for r in ran.values()), max(r[1] for r in ran.values())
        outside = [a for a, r in ran.items() if r[0] < 0.0 or r[1] > 1.0]
        checks.append(SanityCheck("range", not outside,
                                  f"every x' in [0, 1] (min {lo:.6g}, max {hi:.6g})" if not outside else
                                  f"x' leaves [0, 1] under {', '.join(outside)} (min {lo:.6g}, max {hi:.6g})"))

    if "pgd20" in pointwise and "pgd100" in pointwise:
        if result.mode == "independent":
            acc = result.per_attack
            slack = max(100.0 / result.n_examples, 0.5)
            ok = acc["pgd100"] <= acc["pgd20"] + slack
            checks.append(SanityCheck(
                "pgd100 ≤ pgd20", ok,
                f"pgd100 {acc['pgd100']:.2f}% vs pgd20 {acc['pgd20']:.2f}% (slack {slack:.2f} pp)" if ok else
                f"pgd100 {acc['pgd100']:.2f}% is above pgd20 {acc['pgd20']:.2f}% by more than {slack:.2f} pp: "
                "more steps should not help the model; suspect the attack or gradient masking"))
        else:
            checks.append(SanityCheck("pgd100 ≤ pgd20", None, "not comparable in cascade mode"))

    bb = [a for a in pointwise if a in black_box]
    wb = [a for a in pointwise if a not in black_box]
    if bb and wb:
        cols = {a: result.attacks.index(a) for a in pointwise}
        wb_robust = np.all([result.flags[:, cols[a]] == 1 for a in wb], axis=0)
        bb_broken = np.any([result.flags[:, cols[a]] == 0 for a in bb], axis=0)
        only_bb = int((wb_robust & bb_broken).sum())
        # A calibrated one-sided binomial test against healthy models' rate, not a fixed count
        # (docs/evaluation.md, "Audit"): a fixed count fired on healthy models at n = 200.
        verdict, p = black_box_test(only_bb, result.n_examples)
        ok = verdict != "fail"
        checks.append(SanityCheck(
            "black-box vs white-box", ok,
            f"{only_bb} example(s) broken only by black-box attacks ({', '.join(bb)}; binomial p = {p:.2g} against "
            f"{100 * BLACK_BOX_REFERENCE_RATE:g}%)" if ok else
            f"black-box attacks ({', '.join(bb)}) broke {only_bb} example(s) ({100.0 * only_bb / result.n_examples:.2f}%) "
            f"that every white-box attack missed (binomial p = {p:.2g} against healthy models' "
            f"{100 * BLACK_BOX_REFERENCE_RATE:g}%): the gradients may be masked; trust the lower numbers"))
    return checks


#: significance level of the one-sided binomial test "clean accuracy above chance (1 / classes)"
CHANCE_ALPHA = 0.01
#: a model that gives one answer (a class, or no strict top class at all) on this share of the
#: clean images or more has collapsed, unless the labels are mostly that class too
ONE_ANSWER_SHARE = 0.9
#: the one-answer check needs at least this many images (below it a healthy model can look collapsed)
ONE_ANSWER_MIN_IMAGES = 10


def degenerate_model_checks(result: EvalResult, predicted: np.ndarray, n_classes: int) -> list[SanityCheck]:
    """The checks that a degenerate model fails (docs/evaluation.md, "Sanity checks"): its clean
    predictions collapse onto one answer, or its clean accuracy is not above chance. Either way its
    robust accuracies are numbers without meaning (an all-zero model is "robust" on every image it
    gets right by luck), so the result is marked unreliable."""
    return [_one_answer_check(result, predicted), _chance_check(result, n_classes)]


def _one_answer_check(result: EvalResult, predicted: np.ndarray) -> SanityCheck:
    n = len(predicted)
    if n < ONE_ANSWER_MIN_IMAGES:
        return SanityCheck("predictions", None, f"too few images ({n}) to tell a collapsed model from a healthy one")
    answers, counts = np.unique(predicted, return_counts=True)
    top = int(answers[counts.argmax()])
    share = counts.max() / n
    label_share = float(np.mean(result.labels == top)) if top >= 0 else 0.0
    what = "no single top class (tied logits)" if top < 0 else f"class {top}"
    if share >= ONE_ANSWER_SHARE and label_share < 0.5:
        labels = "" if top < 0 else f" (the labels are {100 * label_share:.1f}% that class)"
        return SanityCheck("predictions", False,
                           f"the model answers {what} on {100 * share:.1f}% of the clean images{labels}: it has "
                           "collapsed, and no accuracy it gets means anything")
    return SanityCheck("predictions", True, f"the most common answer, {what}, covers {100 * share:.1f}% of the "
                                            f"clean images")


def _chance_check(result: EvalResult, n_classes: int) -> SanityCheck:
    from scipy.stats import binomtest

    n, k = len(result.clean), int(result.clean.sum())
    chance = 1.0 / max(n_classes, 1)
    if n_classes < 2 or binomtest(n, n, chance, alternative="greater").pvalue > CHANCE_ALPHA:
        return SanityCheck("above chance", None, f"too few images ({n}) to test clean accuracy against chance "
                                                 f"({100 * chance:.2f}%)")
    p = binomtest(k, n, chance, alternative="greater").pvalue
    text = (f"clean accuracy {100 * k / n:.2f}% ({k} of {n}) vs chance {100 * chance:.2f}% ({n_classes} classes): "
            f"one-sided binomial test p = {p:.2g}")
    if p >= CHANCE_ALPHA:
        return SanityCheck("above chance", False, f"{text} ≥ {CHANCE_ALPHA}: not above chance, so the model is "
                                                  "degenerate and its robust accuracies mean nothing")
    return SanityCheck("above chance", True, f"{text} < {CHANCE_ALPHA}")


def non_finite_tensors(model: nn.Module) -> list[str]:
    """What makes the model's weights unusable (`nets.unusable_weights`): NaN/inf anywhere, or a
    BatchNorm running variance below zero."""
    return unusable_weights(model)


def check_finite_weights(model: nn.Module, label: str = "the model") -> None:
    """Refuse a model with non-finite weights or buffers (e.g. BatchNorm's running_var after a diverged
    run) or a negative BatchNorm variance."""
    bad = non_finite_tensors(model)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"{label} has non-finite or invalid weights or buffers ({shown}), so its predictions mean "
                        "nothing and no number was computed: evaluate a checkpoint from before training diverged, or "
                        "train again with a smaller `lr`")


def check_finite_logits(n_bad: int, n: int, label: str = "the model") -> SanityCheck:
    """The `finite` check after the clean pass: refused (UserError) when any clean logit is NaN or infinite."""
    if n_bad:
        raise UserError(f"{label} gives non-finite logits on {n_bad} of {n} clean images, so its predictions mean "
                        "nothing and no number was computed: evaluate a checkpoint from before training diverged")
    return SanityCheck("finite", True, f"every weight, buffer and clean logit is finite ({n} images)")
