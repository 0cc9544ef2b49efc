"""A study file (YAML, recipes/studies/*.yaml) as a typed, validated `StudySpec`.

A study asks one question of one base model: does fine-tuning it with each arm (method × loss,
every scope and seed) buy anything over the control arm, at the same budget? The file states the
base model, the data and ε, the fine-tuning budget every arm shares, the arms, seeds per scope,
the control, what to evaluate on how many images, the masking check, the audit and the cost
benchmark (docs/study.md has the full reference). Every value is checked here, before any job
runs, and errors name the file and the key.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError

SCOPES = ("full", "last-layer")
BASE_KINDS = ("zoo", "checkpoint", "train", "pretrain")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class Arm:
    method: str
    loss: str
    settings: tuple[tuple[str, Any], ...] = ()   # this arm's own training settings (on top of the budget)

    @property
    def label(self) -> str:
        return f"{self.method}/{self.loss}"


@dataclass
class StudySpec:
    path: Path
    name: str
    title: str
    description: str
    seed: int
    device: str
    dataset: str
    threat_model: str
    eps: str | None
    base_name: str
    base_kind: str                       # one of BASE_KINDS
    base: dict[str, Any]                 # the kind's settings (zoo name, checkpoint, training rounds, ...)
    finetune: dict[str, Any]             # TrainConfig values every arm shares; lr may be per scope
    seeds: dict[str, list[int]]
    arms: list[Arm]
    control: Arm
    run_name: str                        # template: {study} {method} {loss} {scope} {seed}
    pointwise: dict[str, Any]            # attacks or suite, mode, n_examples, batch_size, attack_settings, entry
    wasserstein: dict[str, Any] | None   # budgets (the `wasserstein` suite), or None
    masking: dict[str, Any] | None
    audit: dict[str, Any] | None
    bench: dict[str, Any] | None
    out: Path                            # where `report` writes (entries are copied there by `run`)
    raw: dict[str, Any] = field(default_factory=dict)
    only: frozenset[str] | None = None   # re-run just these arms (and the base); the rest stays as reported

    def selected(self, arm: Arm) -> bool:
        return self.only is None or arm.label in self.only

    def runs(self) -> list[tuple[str, Arm, str, int]]:
        """(run name, arm, scope, seed) for every fine-tuning run, in the file's order."""
        return [(self.run_name.format(study=self.name, method=a.method, loss=a.loss, scope=scope, seed=seed),
                 a, scope, seed) for scope, seeds in self.seeds.items() for seed in seeds for a in self.arms]

    def models(self) -> list[str]:
        """The base model's name, then every run's: what gets evaluated."""
        return [self.base_name] + [r[0] for r in self.runs()]

    def lr(self, scope: str) -> float | None:
        lr = self.finetune.get("lr")
        return lr.get(scope) if isinstance(lr, dict) else lr

    def budget(self) -> dict[str, Any]:
        """What every job of the study depends on: a workspace refuses a study file whose budget changed."""
        keep = ("seed", "device", "dataset", "threat_model", "eps", "base", "finetune", "seeds", "arms", "control",
                "run_name", "eval", "masking", "audit")
        return {k: self.raw.get(k) for k in keep}


def _fail(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}")


def _arm(item: Any, path: Path) -> Arm:
    settings: dict[str, Any] = {}
    if isinstance(item, dict):
        if set(item) - {"arm", "set"} or "arm" not in item:
            raise _fail(path, f"an arm is 'method/loss' or {{arm: method/loss, set: {{...}}}}, got {item!r}")
        settings = dict(item.get("set") or {})
        item = item["arm"]
    method, _, loss = str(item).partition("/")
    if not method.strip() or not loss.strip():
        raise _fail(path, f"arm {item!r} must be written method/loss (e.g. exp-am/ce)")
    return Arm(method.strip(), loss.strip(), tuple(sorted(settings.items())))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def read_study_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file {path} does not exist: give the path of a study YAML "
                        "(the shipped ones are in recipes/studies/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise _fail(path, f"not a readable UTF-8 YAML file ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise _fail(path, "a study file must be a YAML mapping")
    return data


def load_study(path: str | Path, smoke: bool = False, out: str | Path | None = None,
               only: str | None = None) -> StudySpec:
    """The study file as a StudySpec; `smoke` overlays its `smoke:` section (a tiny end-to-end check);
    `only` ("method/loss[,method/loss]") restricts the jobs to those arms' runs and the base."""
    from ..methods import METHODS, check_method_loss

    path = Path(path)
    data = read_study_file(path)
    if smoke:
        data = _merge(data, data.get("smoke") or {})
    unknown = set(data) - {"study", "title", "description", "seed", "device", "dataset", "threat_model", "eps",
                           "base", "finetune", "seeds", "arms", "control", "run_name", "eval", "masking", "audit",
                           "bench", "report", "smoke"}
    if unknown:
        raise _fail(path, f"unknown key {sorted(unknown)[0]!r}")
    for key in ("study", "dataset", "base", "finetune", "seeds", "arms", "control", "eval"):
        if key not in data:
            raise _fail(path, f"missing key {key!r}")
    name = str(data["study"])
    if not _NAME.match(name):
        raise _fail(path, f"study name {name!r}: use letters, digits and . _ + - only")
    base = dict(data["base"])
    kinds = [k for k in BASE_KINDS if k in base]
    if len(kinds) != 1:
        raise _fail(path, f"base needs exactly one of {', '.join(BASE_KINDS)}, got {kinds or 'none'}")
    base_name = str(base.get("name") or (base["zoo"] if kinds[0] == "zoo" else f"{name}-base"))
    if not _NAME.match(base_name):
        raise _fail(path, f"base name {base_name!r}: use letters, digits and . _ + - only")
    seeds = {str(k): [int(s) for s in v] for k, v in dict(data["seeds"]).items()}
    bad = [s for s in seeds if s not in SCOPES]
    if bad or not seeds or any(not v for v in seeds.values()):
        raise _fail(path, f"seeds maps scopes ({', '.join(SCOPES)}) to lists of seeds, got {data['seeds']!r}")
    arms = [_arm(a, path) for a in data["arms"]]
    control = _arm(data["control"], path)
    if len({a.label for a in arms}) != len(arms):
        raise _fail(path, "an arm is listed twice")
    if control.label not in {a.label for a in arms}:
        raise _fail(path, f"the control {control.label!r} must be one of the arms")
    control = next(a for a in arms if a.label == control.label)
    for a in arms:
        if a.method not in METHODS:
            raise _fail(path, f"arm {a.label}: unknown method {a.method!r} (known: {', '.join(sorted(METHODS))})")
        try:
            check_method_loss(a.method, a.loss)
        except UserError as e:
            raise _fail(path, f"arm {a.label}: {e}") from None
    ev = dict(data["eval"])
    pointwise = dict(ev.get("pointwise") or {})
    if not pointwise or ("attacks" in pointwise) == ("suite" in pointwise):
        raise _fail(path, "eval.pointwise needs exactly one of attacks or suite")
    pointwise.setdefault("mode", "independent")
    pointwise.setdefault("entry", "aa")
    pointwise["n_examples"] = int(pointwise.get("n_examples", 1000))
    pointwise["batch_size"] = int(pointwise.get("batch_size", 256))
    wasserstein = dict(ev["wasserstein"]) if ev.get("wasserstein") else None
    run_name = str(data.get("run_name", "{study}-{method}-{loss}-{scope}-s{seed}"))
    spec = StudySpec(
        path=path, name=name, title=str(data.get("title", name)),
        description=" ".join(str(data.get("description", "")).split()), seed=int(data.get("seed", 0)),
        device=str(data.get("device", "auto")), dataset=str(data["dataset"]),
        threat_model=str(data.get("threat_model", "Linf")),
        eps=None if data.get("eps") is None else str(data["eps"]), base_name=base_name, base_kind=kinds[0],
        base=base, finetune=dict(data["finetune"]), seeds=seeds, arms=arms, control=control, run_name=run_name,
        pointwise=pointwise, wasserstein=wasserstein, masking=dict(data["masking"]) if data.get("masking") else None,
        audit=dict(data["audit"]) if isinstance(data.get("audit"), dict) else ({} if data.get("audit") else None),
        bench=dict(data["bench"]) if data.get("bench") else None,
        out=Path(out) if out is not None else _out_dir(path, data), raw=data)
    if only is not None:
        chosen = {_arm(a.strip(), path).label for a in only.split(",") if a.strip()}
        unknown = chosen - {a.label for a in arms}
        if not chosen or unknown:
            raise UserError(f"only {only!r}: name arms of the study ({', '.join(a.label for a in arms)})")
        spec.only = frozenset(chosen)
    names = [r[0] for r in spec.runs()]
    if len(set(names)) != len(names) or not all(_NAME.match(n) for n in names):
        raise _fail(path, f"run_name {run_name!r} must give every run its own plain name")
    return spec


def _out_dir(path: Path, data: dict[str, Any]) -> Path:
    """report.out (default studies/<study>), relative to the current folder like every path a command takes."""
    return Path(str((data.get("report") or {}).get("out") or Path("studies") / str(data["study"])))
