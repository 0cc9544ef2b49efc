"""Progress that moves: long attacks report how far they are inside a batch (steps, feature-attack rounds,
AutoAttack's parts and passes), so one batch holding every image never leaves a bar at 0/N. Counted with
a fake clock that never throttles, and checked throttled with one that stands still."""
from __future__ import annotations

import pytest

from adt_finetune.evaluation import engine, evaluate
from adt_finetune.progress import Reporter


class Recorder(Reporter):
    def __init__(self):
        self.updates: dict[str, list[tuple[float, str | None]]] = {}
        self.totals: dict[str, int] = {}

    def start(self, key, description, total, completed=0, status=""):
        self.totals[key] = total
        self.updates[key] = []

    def update(self, key, completed, status=None):
        self.updates[key].append((completed, status))


@pytest.fixture
def ticking(monkeypatch):
    """A clock that moves a second per look: every report inside a batch gets through."""
    t = [0.0]

    def clock():
        t[0] += 1.0
        return t[0]

    monkeypatch.setattr(engine, "progress_clock", clock)


SETTINGS = {"feature": {"targets": 4, "pool": 40, "steps": 10, "chunk": 16}, "spsa": {"iterations": 5, "samples": 8},
            "exp": {"steps": 5, "samples": 2}}


def _run(model, x, y, attacks, **kw):
    rec = Recorder()
    evaluate(model, x, y, attacks=attacks, eps=0.1, batch_size=len(x), reporter=rec,
             attack_settings=SETTINGS, **kw)
    return rec


def test_long_attacks_report_progress_within_one_batch(trained_cnn, fmnist_test, ticking):
    x, y = fmnist_test[0][:24], fmnist_test[1][:24]
    rec = _run(trained_cnn, x, y, ["pgd20", "cw", "mim", "feature", "autoattack", "spsa", "exp"])
    minimum = {"pgd20": 20, "cw": 30, "mim": 20, "feature": 10, "autoattack": 30, "spsa": 2, "exp": 5}
    for attack, n in minimum.items():
        ups, total = rec.updates[attack], rec.totals[attack]
        assert len(ups) >= n, (attack, len(ups))
        done = [c for c, _ in ups]
        assert done == sorted(done) and 0 <= done[0] and done[-1] <= total, attack  # moves forward, never past N
        assert all(s for _, s in ups), attack   # and says what it is doing
    assert ("step 20/20" in rec.updates["pgd20"][-1][1]) and "step 1/30" in rec.updates["cw"][0][1]
    assert any("apgd-ce (1/4)" in s for _, s in rec.updates["autoattack"])
    assert any("images 1–4 of" in s for _, s in rec.updates["feature"])


def test_progress_within_a_batch_is_throttled(trained_cnn, fmnist_test, monkeypatch):
    monkeypatch.setattr(engine, "progress_clock", lambda: 0.0)  # time stands still: one update per batch
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    rec = Recorder()
    evaluate(trained_cnn, x, y, attacks=["pgd20"], eps=0.1, batch_size=8, chunk_size=8, reporter=rec)
    assert len(rec.updates["pgd20"]) == 2
