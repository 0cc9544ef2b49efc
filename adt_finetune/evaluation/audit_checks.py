"""The audit's verdicts: numbers in, one `AuditCheck` out (docs/evaluation.md, "Audit").

Nothing here runs a model; `audit` measures, these functions judge. Every
threshold is a named constant that the docs cite, with where it comes from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

VERDICTS = ("pass", "warn", "fail")

#: Square-only rate of healthy models: the robust-base study's 20 healthy `_parts` entries
#: (n = 200 each) have 0 to 5 Square-only examples (0–2.5%, pooled 0.9%); the test asks whether a
#: model's rate is above the largest of them.
BLACK_BOX_REFERENCE_RATE = 0.025
#: one-sided binomial p-value below which the check fails: a model whose true Square-only rate is at
#: most the reference rate fails with probability at most 1% (its false-alarm rate)
BLACK_BOX_ALPHA_FAIL = 0.01
#: ... and warns below this one (at most 5% of such models)
BLACK_BOX_ALPHA_WARN = 0.05
#: accuracy (%) that an attack with ε = 1 (any image in [0, 1]) must bring a model down to
UNBOUNDED_MAX_PCT = 1.0
#: the stated margin of the convergence, sweep and transfer checks: 1 pp, and never fewer than 2 examples
MARGIN_PP = 1.0
MARGIN_MIN_EXAMPLES = 2
#: gradient health: share of examples (%) with NaN, zero or vanishing input gradients that fails / warns
GRADIENT_FAIL_PCT = 5.0
GRADIENT_WARN_PCT = 1.0
#: a margin-loss input gradient whose largest entry is below this is vanishing (inputs in [0, 1], logits O(1))
VANISHING_GRADIENT = 1e-8
#: share of clean-correct examples (%) whose cross-entropy saturates in float32 that warns
SATURATED_WARN_PCT = 5.0
#: forward passes averaged by EOT when the model is randomised (Athalye et al. 2018 use 10 to 80)
EOT_SAMPLES = 16


@dataclass
class AuditCheck:
    name: str
    verdict: str                  # pass | warn | fail
    detail: str                   # one line: what was measured and what it means
    numbers: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "verdict": self.verdict, "detail": self.detail, "numbers": dict(self.numbers)}


def margin_examples(n: int) -> int:
    """The stated margin in examples: MARGIN_PP of n, at least MARGIN_MIN_EXAMPLES."""
    return max(MARGIN_MIN_EXAMPLES, math.ceil(MARGIN_PP / 100.0 * n))


def _pct(k: float, n: int) -> float:
    return 100.0 * k / n if n else 0.0


def black_box_test(k: int, n: int, reference: float = BLACK_BOX_REFERENCE_RATE) -> tuple[str, float]:
    """(verdict, p): the one-sided exact binomial test of H0 "Square-only rate ≤ reference"
    for k Square-only examples among n."""
    from scipy.stats import binomtest

    if n <= 0:
        return "pass", 1.0
    p = float(binomtest(int(k), int(n), reference, alternative="greater").pvalue)
    if p < BLACK_BOX_ALPHA_FAIL:
        return "fail", p
    return ("warn" if p < BLACK_BOX_ALPHA_WARN else "pass"), p


def false_alarm_rate(n: int, rate: float = BLACK_BOX_REFERENCE_RATE, alpha: float = BLACK_BOX_ALPHA_FAIL) -> float:
    """The exact probability that a model whose true Square-only rate is `rate` gets a p-value
    below `alpha` at n examples (the black-box check's false-alarm rate at the reference)."""
    from scipy.stats import binom, binomtest

    # the smallest count that is significant: the test's critical value
    k = next((k for k in range(n + 1) if binomtest(k, n, BLACK_BOX_REFERENCE_RATE, alternative="greater").pvalue
              < alpha), n + 1)
    return float(binom.sf(k - 1, n, rate))


def only_broken_by(flags: np.ndarray, columns: list[str], black_box: list[str], white_box: list[str]) -> int:
    """Examples robust (flag 1) to every white-box column and broken (flag 0) by a black-box one."""
    cols = {a: columns.index(a) for a in black_box + white_box}
    wb_robust = np.all([flags[:, cols[a]] == 1 for a in white_box], axis=0)
    bb_broken = np.any([flags[:, cols[a]] == 0 for a in black_box], axis=0)
    return int((wb_robust & bb_broken).sum())


def black_box_check(k: int, n: int, black_box: list[str], white_box: list[str]) -> AuditCheck:
    verdict, p = black_box_test(k, n)
    numbers = {"only_black_box": k, "n": n, "rate_pct": round(_pct(k, n), 3),
               "reference_rate_pct": 100 * BLACK_BOX_REFERENCE_RATE, "p_value": p, "alpha": BLACK_BOX_ALPHA_FAIL,
               "black_box": black_box, "white_box": white_box}
    what = (f"{k} of {n} example(s) ({_pct(k, n):.1f}%) broken by {', '.join(black_box)} and by none of "
            f"{', '.join(white_box)}; one-sided binomial p = {p:.2g} against {100 * BLACK_BOX_REFERENCE_RATE:g}%")
    tail = {"pass": "consistent with healthy gradients",
            "warn": "more than healthy models show: suspect masked gradients",
            "fail": "gradient attacks miss what a gradient-free one finds: masked gradients; the "
                    "gradient-based numbers (PGD, W-PGD) are upper bounds"}[verdict]
    return AuditCheck("black-box vs white-box", verdict, f"{what}: {tail}", numbers)


def unbounded_check(acc_unbounded: float, sweep: dict[float, float], n: int) -> AuditCheck:
    """`sweep`: PGD-20 accuracy (%) at increasing ε; must not increase beyond the margin."""
    margin = _pct(margin_examples(n), n)
    eps_sorted = sorted(sweep)
    rises = [(a, b) for a, b in zip(eps_sorted, eps_sorted[1:]) if sweep[b] > sweep[a] + margin]
    numbers = {"accuracy_eps1_pct": acc_unbounded, "sweep_pct": {f"{e:.6g}": v for e, v in sweep.items()},
               "max_pct": UNBOUNDED_MAX_PCT, "margin_pp": margin}
    sweep_text = ", ".join(f"{sweep[e]:.1f}% at ε = {e:.4g}" for e in eps_sorted)
    if acc_unbounded > UNBOUNDED_MAX_PCT or rises:
        why = (f"accuracy at ε = 1 is {acc_unbounded:.1f}% (must be ≤ {UNBOUNDED_MAX_PCT:g}%)"
               if acc_unbounded > UNBOUNDED_MAX_PCT else
               f"accuracy rises with ε ({sweep_text})")
        return AuditCheck("unbounded attack", "fail", f"{why}: the attack cannot find adversarial examples that "
                                                      "must exist, so its bounded numbers are upper bounds", numbers)
    return AuditCheck("unbounded attack", "pass", f"{acc_unbounded:.1f}% at ε = 1; PGD-20 {sweep_text}: "
                                                  "falls with ε", numbers)


def convergence_check(reported: float, stronger: float, pgd20: float, n: int, stronger_name: str) -> AuditCheck:
    """`reported`: the white-box accuracy (%) of the suite's attacks; `stronger`: with the longer,
    restarted attack added."""
    margin = _pct(margin_examples(n), n)
    drop = reported - stronger
    numbers = {"pgd20_pct": pgd20, "reported_pct": reported, "stronger_pct": stronger, "drop_pp": drop,
               "margin_pp": margin, "stronger_attack": stronger_name}
    text = f"{reported:.1f}% → {stronger:.1f}% with {stronger_name} (PGD-20 alone {pgd20:.1f}%)"
    if drop > margin:
        return AuditCheck("convergence", "fail", f"{text}: more iterations and restarts lower accuracy by "
                                                 f"{drop:.1f} pp > {margin:.1f} pp; the number is not converged",
                          numbers)
    return AuditCheck("convergence", "pass", f"{text}: within {margin:.1f} pp", numbers)


def transfer_check(transfer_acc: float, white_acc: float, transfer_only: int, n: int, surrogate: str) -> AuditCheck:
    margin = _pct(margin_examples(n), n)
    verdict, p = black_box_test(transfer_only, n)
    numbers = {"transfer_pct": transfer_acc, "white_box_pct": white_acc, "only_transfer": transfer_only,
               "p_value": p, "margin_pp": margin, "surrogate": surrogate}
    text = (f"PGD-20 crafted on {surrogate}: {transfer_acc:.1f}% vs white-box {white_acc:.1f}%; "
            f"{transfer_only} example(s) broken only by transfer (p = {p:.2g})")
    if transfer_acc < white_acc - margin:
        return AuditCheck("transfer", "fail", f"{text}: a surrogate's gradients beat the model's own; masked "
                                              "gradients", numbers)
    if verdict != "pass":
        return AuditCheck("transfer", "warn", f"{text}: more transfer-only examples than healthy models show",
                          numbers)
    return AuditCheck("transfer", "pass", f"{text}: transfer is weaker than white-box, as it should be", numbers)


def gradient_check(stats: dict[str, Any]) -> AuditCheck:
    """`stats` from `audit.gradient_stats`: percentages of examples."""
    bad = max(stats["nan_pct"], stats["zero_pct"], stats["vanishing_pct"], stats["zero_random_pct"],
              stats["non_differentiable_pct"])
    text = (f"input gradients of the margin loss: {stats['nan_pct']:.1f}% NaN, {stats['zero_pct']:.1f}% zero, "
            f"{stats['vanishing_pct']:.1f}% vanishing at x, {stats['zero_random_pct']:.1f}% zero at a random point "
            f"of the ε-ball; {stats['non_differentiable_pct']:.1f}% zero while the loss changes in the ball")
    numbers = dict(stats, fail_pct=GRADIENT_FAIL_PCT, warn_pct=GRADIENT_WARN_PCT)
    if stats["nan_pct"] > 0 or bad > GRADIENT_FAIL_PCT:
        return AuditCheck("gradient health", "fail", f"{text}: gradient attacks have nothing to follow "
                                                     "(non-differentiable input processing or a broken model)",
                          numbers)
    if bad > GRADIENT_WARN_PCT:
        return AuditCheck("gradient health", "warn", f"{text}: some examples give gradient attacks nothing to "
                                                     "follow", numbers)
    return AuditCheck("gradient health", "pass", text, numbers)


def saturation_check(saturated_pct: float, median_margin: float) -> AuditCheck:
    numbers = {"saturated_pct": saturated_pct, "median_logit_margin": median_margin, "warn_pct": SATURATED_WARN_PCT}
    text = (f"{saturated_pct:.1f}% of clean-correct examples have a float32 cross-entropy that is exactly 0 or "
            f"has a zero input gradient (median logit margin {median_margin:.3g})")
    if saturated_pct > SATURATED_WARN_PCT:
        return AuditCheck("saturated softmax", "warn", f"{text}: cross-entropy attacks stall there; trust "
                                                       "margin-loss attacks (cw, apgd-t) over CE ones", numbers)
    return AuditCheck("saturated softmax", "pass", text, numbers)


def randomness_check(max_diff: float, disagree_pct: float, eot: dict[str, float] | None,
                     single: dict[str, float] | None) -> AuditCheck:
    numbers: dict[str, Any] = {"max_logit_difference": max_diff, "prediction_disagreement_pct": disagree_pct}
    if eot is None:
        return AuditCheck("randomness", "pass", "two forward passes give the same logits: the model is "
                                                "deterministic", numbers)
    numbers.update(eot_samples=EOT_SAMPLES, eot_pct=eot, single_sample_pct=single or {})
    shown = ", ".join(f"{a} {v:.1f}% (one sample {(single or {}).get(a, float('nan')):.1f}%)" for a, v in eot.items())
    return AuditCheck("randomness", "warn", f"two forward passes differ (logits by up to {max_diff:.3g}, "
                                            f"{disagree_pct:.1f}% of predictions): randomised model; with EOT over "
                                            f"{EOT_SAMPLES} samples {shown}; report the EOT numbers", numbers)


def wasserstein_check(columns: list[str], black_box: AuditCheck | None) -> AuditCheck:
    numbers = {"columns": columns, "black_box_verdict": None if black_box is None else black_box.verdict}
    if black_box is not None and black_box.verdict == "pass":
        return AuditCheck("wasserstein upper bounds", "pass", f"black-box check passed: W-PGD columns "
                                                              f"({', '.join(columns)}) stand", numbers)
    why = "did not run" if black_box is None else f"did not pass ({black_box.verdict})"
    numbers["upper_bounds"] = columns
    return AuditCheck("wasserstein upper bounds", "warn", f"the black-box check {why}: W-PGD is gradient-based, so "
                                                          f"{', '.join(columns)} are upper bounds", numbers)


def overall(checks: list[AuditCheck]) -> str:
    verdicts = {c.verdict for c in checks}
    return "fail" if "fail" in verdicts else "warn" if "warn" in verdicts else "pass"
