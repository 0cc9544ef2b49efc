"""The inner maximisation that training and attacks share.

    linf            the projected sign-gradient loop (PGD/FGSM/MIM/CW and PGD-AT/TRADES), projection, margins
    tanh_gaussian   the tanh-transformed Gaussian over δ and its entropy estimate (ADT-EXP, ADT-EXP-AM)
    exp             ADT-EXP's per-example distribution: fitting and sampling
    generators      the ADT-EXP-AM / ADT-IMP-AM generator networks, q_ψ, gradient features, generator files
    amortised       a generator (and q_ψ) with its draw, entropy regulariser and diversity diagnostic
    generator_fit   training a fresh generator against a fixed classifier (the exp-am / imp-am attacks)
    wasserstein     W-PGD (dataset-level and per mini-batch), sensitivity Υ, the first-order estimate

`methods/` and `attacks/` both sit on this package and never import each other.
"""
