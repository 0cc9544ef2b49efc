#!/usr/bin/env python
"""The robust-base study (README, "The robust-base study"), as one command.

    python scripts/study_robust.py [--workspace study-robust-ws] [--out leaderboard/robust-base] [--smoke]

1. base: adversarially train a SmallResNet from scratch with PGD-AT on the full
   Fashion-MNIST training set, one round (run) at a time, each continuing the last
   round's weights, until PGD-20 accuracy on held-out test images stops improving;
   register the best round in the workspace like a pulled model;
2. fine-tune that base with every method × scope × seed of the recipe (same budget);
3. evaluate the base and every run on the same test images: AutoAttack + PGD-20 + CW
   (one entry, `<name>_aa`) and the Wasserstein suite at the recipe's budgets (`<name>_w`);
   then the gradient-masking check: every model (`masking.check_all`), or those whose PGD-20
   accuracy (alone) is more than `masking.screen_pp` above their A_rob and the control as a
   reference, is evaluated with AutoAttack's parts one by one (`<name>_parts`, independent
   mode), and each model's rate of examples only gradient-free Square breaks is tested
   against the control's;
4. benchmark every method's training step against the control's, side by side in one
   `adt-ft bench` run per scope (cost per epoch as a ratio, not wall clock);
5. copy the entries and bench results to --out and write the summary and tables (paired
   statistics against the control method, leaderboard.compare), the plot and <out>/README.md.

Part of a study: `--only wdat/trades` trains and evaluates only those methods' runs (and the base),
`--reuse leaderboard/robust-base` fills in every other run's entries from a folder of committed ones
before the write-up (their models are not re-run), and the README says which rows are new and
whether the base reproduced the one the reused entries were measured on.

Resumable by stage: run the same command again. Finished rounds, runs and entries
are skipped, an unfinished run continues from its checkpoint (train(resume=...)),
a half-done evaluation continues from its saved batches.

Training a small model leaves one of two cores mostly idle: a second process started
with --eval-worker (same workspace) evaluates every model as soon as its run has
finished, beside the one that trains. Each entry is claimed by a lock file, so the
two never evaluate the same entry.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The recipe merge and the entry timing are the first study's (scripts/study_fmnist.py, beside this file).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_fmnist import _merge, add_run_timing  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "studies" / "study-robust-fmnist.yaml"
BASE_NAME = "robust-SmallResNet"
THREAT_MODEL = "Linf"
SMOKE_ROOT = Path("/tmp/adt-ft-study-robust-smoke")


@dataclass
class Job:
    method: str
    loss: str
    scope: str
    seed: int

    @property
    def run_name(self) -> str:
        return f"robust-{self.method}-{self.loss}-{self.scope}-s{self.seed}"


@dataclass
class StudySettings:
    seed: int
    device: str
    dataset: str
    base: dict[str, Any]
    train_subset: int | None
    epochs: int
    batch_size: int
    gen_width: int
    lr: dict[str, float]
    seeds: dict[str, list[int]]
    methods: list[tuple[str, str]]
    control: tuple[str, str]
    attacks: str
    mode: str
    n_examples: int
    eval_batch_size: int
    w_budgets: str
    attack_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    bench: dict[str, int] = field(default_factory=dict)   # steps, warmup of the cost benchmark
    masking: dict[str, Any] = field(default_factory=dict)  # screen_pp, n_examples, attacks of the masking check
    description: str = ""

    @property
    def jobs(self) -> list[Job]:
        return [Job(m, loss, scope, seed) for scope, seeds in self.seeds.items() for seed in seeds
                for m, loss in self.methods]

    def base_config(self, round_no: int, previous: str | None, data_dir: str | None = None):
        """Round `round_no` (1-based) of the base's PGD-AT: from scratch, or continuing `previous` (model.pt)."""
        from adt_finetune.config import TrainConfig

        b = self.base
        return TrainConfig(model=previous or "scratch", arch=b["arch"], arch_kwargs=dict(b["arch_kwargs"]),
                           dataset=self.dataset, method=b["method"], epochs=int(b["round_epochs"]),
                           batch_size=int(b["batch_size"]), lr=float(b["lr"]), schedule="constant",
                           train_subset=b.get("train_subset"), seed=self.seed + round_no, device=self.device,
                           run_name=f"base-r{round_no:02d}", data_dir=data_dir)

    def train_config(self, job: Job, data_dir: str | None = None):
        """One fine-tuning run (model None: the workspace's current model, the study base)."""
        from adt_finetune.config import TrainConfig

        return TrainConfig(method=job.method, loss=job.loss, scope=job.scope, epochs=self.epochs,
                           batch_size=self.batch_size, train_subset=self.train_subset, gen_width=self.gen_width,
                           lr=self.lr[job.scope], seed=job.seed, device=self.device, run_name=job.run_name,
                           data_dir=data_dir)

    def budget(self) -> dict[str, Any]:
        return {"base": dict(self.base),
                "finetune": {"train_subset": self.train_subset, "epochs": self.epochs, "batch_size": self.batch_size,
                             "gen_width": self.gen_width, "lr": dict(self.lr), "optimizer": "sgd (momentum 0.9, "
                             "weight decay 2e-4)", "schedule": "cosine"},
                "eval": {"attacks": self.attacks, "mode": self.mode, "n_examples": self.n_examples,
                         "wasserstein_budgets": self.w_budgets, "attack_settings": self.attack_settings},
                "methods": [f"{m}/{loss}" for m, loss in self.methods], "seeds": dict(self.seeds),
                "control": "/".join(self.control), "seed": self.seed, "device": self.device,
                "masking": dict(self.masking)}


def _method(item: Any, path: Path) -> tuple[str, str]:
    method, _, loss = str(item).partition("/")
    if not loss:
        raise ValueError(f"{path}: method {item!r} must be written method/loss (e.g. exp-am/ce)")
    return method.strip(), loss.strip()


def load_settings(path: str | Path = RECIPE, smoke: bool = False) -> StudySettings:
    """The study recipe as settings; `smoke` overlays its `smoke:` section."""
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the study recipe must be a mapping")
    if smoke:
        data = _merge(data, data.get("smoke") or {})
    ft, ev = data["finetune"], data["eval"]
    seeds = {str(k): [int(s) for s in v] for k, v in data["seeds"].items()}
    lr = ft["lr"]
    lr = {s: float(lr) for s in seeds} if not isinstance(lr, dict) else {k: float(v) for k, v in lr.items()}
    methods = [_method(m, path) for m in data["methods"]]
    control = _method(data["control"], path)
    if control not in methods:
        raise ValueError(f"{path}: the control {data['control']!r} must be one of the methods")
    return StudySettings(
        seed=int(data["seed"]), device=str(data.get("device", "cpu")), dataset=str(data["dataset"]),
        base=dict(data["base"]), train_subset=None if ft.get("train_subset") is None else int(ft["train_subset"]),
        epochs=int(ft["epochs"]), batch_size=int(ft["batch_size"]), gen_width=int(ft["gen_width"]), lr=lr,
        seeds=seeds, methods=methods, control=control, attacks=str(ev["attacks"]), mode=str(ev["mode"]),
        n_examples=int(ev["n_examples"]), eval_batch_size=int(ev.get("batch_size", 256)),
        w_budgets=str(ev["wasserstein_budgets"]),
        attack_settings={k: dict(v) for k, v in (ev.get("attack_settings") or {}).items()},
        bench={k: int(v) for k, v in (data.get("bench") or {}).items()},
        masking=dict(data.get("masking") or {}),
        description=" ".join(str(data.get("description", "")).split()))


# ---------------------------------------------------------------- stages

class Study:
    def __init__(self, s: StudySettings, workspace: Path, out: Path, command: str, data_dir: str | None,
                 progress: bool):
        from adt_finetune.workspace import Workspace

        self.s, self.ws, self.out, self.command = s, Workspace(workspace), out, command
        self.data_dir, self.progress = data_dir, progress
        self.state = self.ws.root / ".adt-ft"
        self.times_path = self.state / "study-times.json"
        self.times: dict[str, float] = json.loads(self.times_path.read_text()) if self.times_path.exists() else {}
        self.base_path = self.state / "study-base.json"
        self.only: set[tuple[str, str]] | None = None   # --only: the methods this invocation runs
        self.reuse: Path | None = None                   # --reuse: where the other runs' entries come from

    def selected(self, job: Job) -> bool:
        return self.only is None or (job.method, job.loss) in self.only

    def reuse_entries(self) -> list[str]:
        """Copy the entries of every run --only leaves out from --reuse (not the base's: it is evaluated
        here, so its reproduction can be checked); the copied entry names."""
        if self.reuse is None:
            return []
        dest = self.ws.leaderboard_dir / self.s.dataset / THREAT_MODEL
        dest.mkdir(parents=True, exist_ok=True)
        copied = []
        for job in self.s.jobs:
            if self.selected(job):
                continue
            for kind in ("aa", "w", "parts"):
                entry = f"{job.run_name}_{kind}"
                src = self.reuse / f"{entry}.json"
                if not src.exists() or (dest / src.name).exists():
                    continue
                # the per-example file first: an entry never points at a missing file
                shutil.copy2(self.reuse / f"{entry}.per-example.csv", dest / f"{entry}.per-example.csv")
                shutil.copy2(src, dest / src.name)
                copied.append(entry)
        return copied

    def log(self, text: str) -> None:
        print(text, flush=True)

    def _stage(self, key: str, text: str, skip_reason: str | None, fn) -> Any:
        from adt_finetune.utils import atomic_write_json

        if skip_reason:
            self.log(f"{text}: skipped ({skip_reason})")
            return None
        self.log(f"{text} ...")
        t = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - t
        # Re-read first: an --eval-worker records its stages in the same file.
        if self.times_path.exists():
            self.times = json.loads(self.times_path.read_text())
        self.times[key] = self.times.get(key, 0.0) + seconds  # a resumed stage adds to its earlier part
        atomic_write_json(self.times_path, self.times)
        self.log(f"{text}: done in {seconds:.0f}s")
        return value

    def check_settings(self) -> None:
        """Refuse to mix budgets in one workspace: skipped stages would silently keep the old one."""
        from adt_finetune.utils import atomic_write_json

        path = self.state / "study-settings.json"
        budget = json.loads(json.dumps(self.s.budget()))
        if path.exists():
            if json.loads(path.read_text()) != budget:
                sys.exit(f"error: {self.ws.root} holds a study with another budget ({path}): use a new --workspace")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, budget)

    def entry_path(self, entry: str) -> Path:
        return self.ws.leaderboard_dir / self.s.dataset / THREAT_MODEL / f"{entry}.json"

    # ------------------------------------------------------------ stage 1: the robust base

    def _run_state(self, name: str) -> tuple[bool, bool]:
        """(finished, resumable) for a run folder; a folder that never checkpointed is removed."""
        from adt_finetune.errors import UserError
        from adt_finetune.run_folder import load_run

        folder = self.ws.runs_dir / name
        if not folder.exists():
            return False, False
        try:
            info = load_run(folder, self.ws.root, require_finished=False)
            if info.finished:
                return True, False
            if (folder / "checkpoint.pt").exists():
                return False, True
        except UserError:
            pass
        shutil.rmtree(folder)  # started but never checkpointed: nothing worth keeping
        return False, False

    def _train(self, name: str, cfg) -> None:
        from adt_finetune.cli.report import reporter
        from adt_finetune.training import train

        finished, resume = self._run_state(name)
        if finished:
            return
        if resume:
            train(None, workspace=self.ws.root, reporter=reporter(self.progress), resume=name)
        else:
            train(cfg, workspace=self.ws.root, reporter=reporter(self.progress))

    def heldout_pgd20(self, model_file: Path) -> float:
        """PGD-20 accuracy on the last `heldout` test images (never among the evaluated first n)."""
        import torch
        from torch.utils.data import Subset

        from adt_finetune.attacks import make_attack
        from adt_finetune.data import as_tensors, dataset_info, load_dataset
        from adt_finetune.zoo import build_architecture

        b = self.s.base
        ds = load_dataset(self.s.dataset, "test", data_dir=self.data_dir, workspace=self.ws.root, augment=False)
        n = int(b["heldout"])
        if n + self.s.n_examples > len(ds):
            raise ValueError(f"heldout {n} + n_examples {self.s.n_examples} exceed the test set ({len(ds)})")
        x, y = as_tensors(Subset(ds, range(len(ds) - n, len(ds))))
        model = build_architecture(b["arch"], self.s.dataset, THREAT_MODEL, dict(b["arch_kwargs"]))
        model.load_state_dict(torch.load(model_file, map_location="cpu", weights_only=True))
        attack = make_attack("pgd20", dataset_info(self.s.dataset).eps, seed=self.s.seed)
        robust = torch.cat([attack(model, x[i:i + 500], y[i:i + 500]).robust for i in range(0, n, 500)])
        return float(robust.float().mean())

    def base(self) -> None:
        """Rounds of PGD-AT until held-out PGD-20 stops improving, then register the best round."""
        from adt_finetune import zoo
        from adt_finetune.utils import atomic_write_json

        b = self.s.base
        hist: dict[str, Any] = json.loads(self.base_path.read_text()) if self.base_path.exists() else {"rounds": []}
        rounds = hist["rounds"]
        while not hist.get("stopped"):
            k = len(rounds) + 1
            name = f"base-r{k:02d}"
            previous = str(self.ws.runs_dir / rounds[-1]["run"] / "model.pt") if rounds else None
            self._stage(f"train:{name}", f"[base] PGD-AT round {k} ({name})", None,
                        lambda: self._train(name, self.s.base_config(k, previous, self.data_dir)))
            acc = self._stage(f"heldout:{name}", f"[base] held-out PGD-20 of round {k}", None,
                              lambda: self.heldout_pgd20(self.ws.runs_dir / name / "model.pt"))
            rounds.append({"run": name, "heldout_pgd20": acc})
            best = max(range(len(rounds)), key=lambda i: rounds[i]["heldout_pgd20"])
            self.log(f"[base] round {k}: held-out PGD-20 {100 * acc:.2f}% (best: round {best + 1})")
            if len(rounds) - 1 - best >= int(b["patience"]) or len(rounds) >= int(b["max_rounds"]):
                hist.update(stopped=True, best=rounds[best]["run"])
            atomic_write_json(self.base_path, hist)
        path = self.ws.model_path(self.s.dataset, THREAT_MODEL, BASE_NAME)
        if not path.exists():
            import torch

            model = zoo.build_architecture(b["arch"], self.s.dataset, THREAT_MODEL, dict(b["arch_kwargs"]))
            model.load_state_dict(torch.load(self.ws.runs_dir / hist["best"] / "model.pt", map_location="cpu",
                                             weights_only=True))
            zoo.register_model(model, name=BASE_NAME, arch=b["arch"], arch_kwargs=dict(b["arch_kwargs"]),
                               dataset=self.s.dataset, workspace=self.ws.root, source="study-robust")
        self.set_base_current()

    def set_base_current(self) -> None:
        from adt_finetune.workspace import ModelRef

        b = self.s.base
        # Fine-tuning runs train the current model: make it the base even when stage 1 was skipped.
        self.ws.set_current_model(ModelRef(
            name=BASE_NAME, arch=b["arch"], dataset=self.s.dataset, threat_model=THREAT_MODEL,
            path=str(self.ws.model_path(self.s.dataset, THREAT_MODEL, BASE_NAME)), source="study-robust",
            arch_kwargs=dict(b["arch_kwargs"])))

    # ------------------------------------------------------------ stage 2: fine-tuning

    def train(self, job: Job) -> None:
        finished, resume = self._run_state(job.run_name)
        self._stage(f"train:{job.run_name}", f"[finetune] {'resume' if resume else 'train'} {job.run_name}",
                    "finished" if finished else None,
                    lambda: self._train(job.run_name, self.s.train_config(job, self.data_dir)))

    # ------------------------------------------------------------ stage 3: evaluation

    def _claim(self, entry: str) -> bool:
        """Take the entry's lock (False: another live process holds it)."""
        path = self.state / "locks" / f"{entry}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
                os.kill(pid, 0)
                return False
            except (ValueError, ProcessLookupError, FileNotFoundError):
                path.unlink(missing_ok=True)  # its process is gone: a stale lock
                return self._claim(entry)
            except PermissionError:
                return False  # alive, someone else's
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True

    def _release(self, entry: str) -> None:
        (self.state / "locks" / f"{entry}.lock").unlink(missing_ok=True)

    def _finished(self, run: str | None) -> bool:
        """Whether a model is ready to evaluate; never touches a run another process may be training."""
        from adt_finetune.errors import UserError
        from adt_finetune.run_folder import load_run

        if run is None:
            return self.ws.model_path(self.s.dataset, THREAT_MODEL, BASE_NAME).exists()
        try:
            return load_run(self.ws.runs_dir / run, self.ws.root, require_finished=False).finished
        except (UserError, OSError):
            return False

    def _eval(self, name: str, run: str | None, kind: str) -> None:
        from adt_finetune.cli.report import reporter
        from adt_finetune.evaluation import EvalRequest, evaluate_workspace

        s = self.s
        entry = f"{name}_{kind}"
        kwargs: dict[str, Any] = dict(
            n_examples=s.n_examples, batch_size=s.eval_batch_size, seed=s.seed, device=s.device,
            data_dir=self.data_dir, workspace=self.ws.root, resume=True, entry=entry)
        if kind == "aa":
            kwargs.update(attacks=s.attacks, mode=s.mode, attack_settings=s.attack_settings)
        elif kind == "parts":  # each part on every example: the per-example masking check needs all columns
            kwargs.update(attacks=str(s.masking["attacks"]), mode="independent",
                          n_examples=int(s.masking["n_examples"]))
        else:
            kwargs.update(suite="wasserstein", budgets=s.w_budgets)
        if run is None:  # the base: by file, so that it works whatever the current model is
            b = s.base
            kwargs.update(model=str(self.ws.model_path(s.dataset, THREAT_MODEL, BASE_NAME)), arch=b["arch"],
                          arch_kwargs=dict(b["arch_kwargs"]), dataset=s.dataset)
        else:
            kwargs.update(run=run)

        def work():
            record = evaluate_workspace(EvalRequest(**kwargs), reporter=reporter(self.progress))
            if run is not None:
                add_run_timing(record.json_path, self.ws.runs_dir / run)

        self._stage(f"eval:{entry}", f"[eval] {entry}", "entry exists" if self.entry_path(entry).exists() else None,
                    work)

    def evaluate(self, poll_s: float = 15.0) -> None:
        """Every entry, skipping those another process holds, until all exist (waits for them)."""
        models = [(BASE_NAME, None)] + [(j.run_name, j.run_name) for j in self.s.jobs if self.selected(j)]
        # the cheap suite first: its answers are in early
        self._evaluate_all([(name, run, kind) for kind in ("w", "aa") for name, run in models], poll_s)

    def _evaluate_all(self, todo: list[tuple[str, str | None, str]], poll_s: float) -> None:
        while True:
            pending = 0
            for name, run, kind in todo:
                entry = f"{name}_{kind}"
                if self.entry_path(entry).exists():
                    continue
                if not self._finished(run) or not self._claim(entry):
                    pending += 1
                    continue
                try:
                    self._eval(name, run, kind)
                finally:
                    self._release(entry)
            if not pending:
                return
            time.sleep(poll_s)

    def reference_run(self) -> str:
        """The control's first run in the first scope: the masking check's reference model."""
        return next(j.run_name for j in self.s.jobs if (j.method, j.loss) == self.s.control)

    def masking_rows(self) -> list[dict[str, Any]]:
        """The screen over every model (needs its `_aa` and `_w` entries)."""
        from adt_finetune import leaderboard

        def read(name: str, kind: str):
            return leaderboard.read_entry(self.entry_path(f"{name}_{kind}"), self.s.dataset, THREAT_MODEL)

        return masking_screen([(n, read(n, "aa"), read(n, "w")) for n in self.names()],
                              float(self.s.masking["screen_pp"]), self.reference_run(),
                              bool(self.s.masking.get("check_all", False)))

    def check_masking(self, poll_s: float = 15.0) -> None:
        """AutoAttack's parts one by one on the screened models and the reference (after `evaluate`)."""
        if not self.s.masking:
            return
        runs = {j.run_name: j.run_name for j in self.s.jobs}
        self._evaluate_all([(r["name"], runs.get(r["name"]), "parts") for r in self.masking_rows() if r["check"]],
                           poll_s)

    # ------------------------------------------------------------ stage 4: cost per epoch

    def bench_path(self, scope: str) -> Path:
        return self.state / f"study-bench-{scope}.json"

    def bench(self) -> None:
        """Each method's training step against the control's, timed round-robin in one run per scope
        (docs/bench.md): the same architecture, batch size and generator width as the fine-tuning."""
        from adt_finetune.bench import run_benchmark

        s, b = self.s, self.s.base
        for scope in s.seeds:
            def work(scope=scope):
                result = run_benchmark(
                    b["arch"], dataset=s.dataset, arch_kwargs=dict(b["arch_kwargs"]),
                    methods=list(dict.fromkeys(m for m, _ in s.methods)),
                    losses=sorted({loss for _, loss in s.methods}), attacks=[], batch_size=s.batch_size,
                    device=s.device, steps=s.bench.get("steps", 5), warmup=s.bench.get("warmup", 1), seed=s.seed,
                    config_overrides={"gen_width": s.gen_width, "scope": scope}, strict=True)
                result.save_json(self.bench_path(scope))

            self._stage(f"bench:{scope}", f"[bench] step-time ratios to the control, scope {scope}",
                        "measured" if self.bench_path(scope).exists() else None, work)

    def bench_ratios(self, scope: str) -> dict[tuple[str, str], float | None]:
        path = self.bench_path(scope)
        rows = json.loads(path.read_text())["rows"] if path.exists() else []
        return {(r["name"], r["loss"]): r["ratio"] for r in rows if r["kind"] == "method"}

    # ------------------------------------------------------------ stage 5: the write-up

    def names(self) -> list[str]:
        return [BASE_NAME] + [j.run_name for j in self.s.jobs]

    def publish(self, wall_s: float) -> None:
        from adt_finetune import leaderboard
        from adt_finetune.utils import atomic_write_text

        def work():
            self.out.mkdir(parents=True, exist_ok=True)
            src = self.ws.leaderboard_dir / self.s.dataset / THREAT_MODEL
            for name in self.names():
                for kind in ("aa", "w", "parts"):
                    for suffix in (".json", ".per-example.csv"):
                        f = src / f"{name}_{kind}{suffix}"
                        if f.exists():
                            shutil.copy2(f, self.out / f.name)
            entries = {kind: [leaderboard.read_entry(self.out / f"{n}_{kind}.json", self.s.dataset, THREAT_MODEL)
                               for n in self.names()]
                       for kind in ("aa", "w")}
            for scope in self.s.seeds:
                if self.bench_path(scope).exists():
                    shutil.copy2(self.bench_path(scope), self.out / f"bench-{scope}.json")
            forest_plot(self, entries, self.out / "study.png")
            atomic_write_text(self.out / "README.md", readme_text(self, entries, wall_s))

        self._stage("publish", f"[publish] entries, table and plot into {self.out}", None, work)


def comparisons(study: Study, entries: list, scope: str) -> str:
    """Markdown: each method's seed group against the control's, same scope (leaderboard.compare)."""
    from adt_finetune.leaderboard.compare import compare_entries, render_comparisons

    s = study.s
    by_name = dict(zip(study.names(), entries))
    jobs = [j for j in s.jobs if j.scope == scope]
    control = [by_name[j.run_name] for j in jobs if (j.method, j.loss) == s.control]
    others = [by_name[j.run_name] for j in jobs if (j.method, j.loss) != s.control]
    if not control or not others:
        return ""
    grouped = len(s.seeds[scope]) > 1
    out = [render_comparisons(compare_entries(control + others, group_seeds=grouped, workspace=study.ws.root),
                              "markdown").rstrip()]
    if grouped:  # p-values need single entries: the first seed of each, paired
        first = [e for e, j in zip(control + others, [j for j in jobs if (j.method, j.loss) == s.control]
                                   + [j for j in jobs if (j.method, j.loss) != s.control])
                 if j.seed == s.seeds[scope][0]]
        out += ["", f"Seed {s.seeds[scope][0]} only (exact McNemar p-values):", "",
                render_comparisons(compare_entries(first), "markdown").rstrip()]
    return "\n".join(out)


def summary(study: Study, entries: dict[str, list], scope: str) -> str:
    """Markdown, one row per method and measure: the control's and the method's accuracy, B − A with
    its 95% paired bootstrap interval (seed groups), exact McNemar p per seed pair and the same
    Holm-adjusted over every p-value of the table, and the bench's step-time ratio to the control
    (cost per epoch, the same images per epoch for every method). W-PGD columns get neither interval
    nor p-value: their outcomes are coupled through the shared budget (leaderboard.compare)."""
    from adt_finetune.leaderboard.compare import compare_entries, format_p, holm_adjust

    s = study.s
    jobs = [j for j in s.jobs if j.scope == scope]
    at = {n: i for i, n in enumerate(study.names())}

    def side(kind: str, method: tuple[str, str], seed: int | None = None) -> list:
        return [entries[kind][at[j.run_name]] for j in jobs
                if (j.method, j.loss) == method and (seed is None or j.seed == seed)]

    ratios = study.bench_ratios(scope)
    seeds = s.seeds[scope]
    tag = "/".join(f"s{x}" for x in seeds)
    head = ["method", "measure", f"control ({'/'.join(s.control)})", "method", "B − A (pp)", "95% CI",
            f"McNemar p {tag}", f"Holm p {tag}", "step time × control"]
    rows: list[tuple[list[str], list[float | None]]] = []
    for m in [m for m in s.methods if m != s.control]:
        first = True
        for kind in ("aa", "w"):
            comp = compare_entries(side(kind, s.control) + side(kind, m), group_seeds=len(seeds) > 1,
                                   workspace=study.ws.root)[0]
            p_values: dict[str, list[float | None]] = {}
            for seed in seeds:
                for c in compare_entries(side(kind, s.control, seed) + side(kind, m, seed))[0].columns:
                    p_values.setdefault(c.column, []).append(c.p_value)
            for c in comp.columns:
                # clean and A_rob from the pointwise entry; every Wasserstein column but its clean copy
                if (kind == "aa" and c.column not in ("clean", "A_rob")) or (kind == "w" and c.column == "clean"):
                    continue
                ratio = ratios.get(m)
                cells = ["/".join(m) if first else "", c.column if kind == "aa" else f"W: {c.column}", c.a.text(),
                         c.b.text(), f"{c.diff:+.2f}",
                         "n/a (coupled)" if c.ci is None else f"[{c.ci[0]:+.2f}, {c.ci[1]:+.2f}]"]
                rows.append((cells + [(f"{ratio:.2f}" if ratio else "—") if first else ""],
                             p_values.get(c.column, [])))
                first = False
    # One family: every McNemar p-value of the table (each method, measure and seed against the control).
    flat = [p for _, ps in rows for p in ps if p is not None]
    adjusted = iter(holm_adjust(flat))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cells, ps in rows:
        raw = " / ".join("n/a" if p is None else format_p(p) for p in ps) or "—"
        adj = " / ".join("n/a" if p is None else format_p(next(adjusted)) for p in ps) or "—"
        lines.append("| " + " | ".join(cells[:-1] + [raw, adj, cells[-1]]) + " |")
    lines += ["", f"Holm p: Holm's step-down adjustment over the {len(flat)} McNemar tests of this table "
              "(statsmodels multipletests, method 'holm'). W-PGD columns: the difference only (n/a): W-PGD "
              "shares one budget over the evaluated set, so images are not independent and neither McNemar "
              "nor a bootstrap over images is valid."]
    return "\n".join(lines)


def forest_plot(study: Study, entries: dict[str, list], path: Path) -> None:
    """One panel per scope: each method's difference to the control (B − A, pp) with its 95% paired
    bootstrap interval, for clean accuracy, A_rob and W-PGD at δ = ε; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adt_finetune.leaderboard.compare import compare_entries
    from adt_finetune.utils import atomic_path

    s = study.s
    at = {n: i for i, n in enumerate(study.names())}
    wpgd = column_at(entries["w"][0], "wpgd", entries["aa"][0].eps)
    measures = [("aa", "clean", "clean", "tab:gray"), ("aa", "A_rob", "A_rob (AutoAttack + PGD-20 + CW)", "tab:blue"),
                ("w", wpgd, f"W-PGD, δ = {entries['aa'][0].eps_label}", "tab:orange")]
    others = [m for m in s.methods if m != s.control]
    fig, axes = plt.subplots(1, len(s.seeds), figsize=(6 * len(s.seeds), 0.6 * len(others) + 2), sharey=True,
                             squeeze=False)
    for ax, (scope, seeds) in zip(axes[0], s.seeds.items()):
        jobs = [j for j in s.jobs if j.scope == scope]
        for row, m in enumerate(others):
            columns = {}  # one comparison per kind of entry, every column of it
            for kind in ("aa", "w"):
                side = [entries[kind][at[j.run_name]] for method in (s.control, m) for j in jobs
                        if (j.method, j.loss) == method]  # the control first
                comp = compare_entries(side, group_seeds=len(seeds) > 1, workspace=study.ws.root)[0]
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
        ax.set_yticks(range(len(others)), ["/".join(m) for m in others])
        ax.set_xlabel(f"difference to {'/'.join(s.control)} (pp), 95% paired bootstrap interval "
                      "(W-PGD: none, hollow)")
        ax.set_title(f"scope {scope} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()  # shared: the recipe's order from the top, in every panel
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def versus_base(study: Study, entries: dict[str, list]) -> str:
    """Markdown, one row per run: B − A against the base model (no fine-tuning) with exact McNemar p
    (Holm-adjusted over the table), for clean, A_rob and W-PGD at δ = ε (the difference only: coupled
    outcomes): does fine-tuning the robust base change it at all?"""
    from adt_finetune.leaderboard.compare import compare_entries, format_p, holm_adjust

    base = {kind: entries[kind][0] for kind in ("aa", "w")}
    wpgd = column_at(base["w"], "wpgd", base["aa"].eps)
    head = ["run", "clean", "A_rob", f"W: {wpgd}" if wpgd else "W-PGD"]
    found = []
    for i, name in enumerate(study.names()[1:], start=1):
        cols = {}
        for kind in ("aa", "w"):
            for c in compare_entries([base[kind], entries[kind][i]])[0].columns:
                cols[(kind, c.column)] = c
        found.append((name, [cols.get(k) for k in (("aa", "clean"), ("aa", "A_rob"), ("w", wpgd))]))
    tested = [c for _, cs in found for c in cs if c is not None and c.p_value is not None]
    adjusted = dict(zip(map(id, tested), holm_adjust([c.p_value for c in tested])))

    def cell(c) -> str:
        if c is None:
            return "—"
        if c.p_value is None:
            return f"{c.b.text()} ({c.diff:+.1f})"
        return f"{c.b.text()} ({c.diff:+.1f}, p {format_p(c.p_value)}, Holm {format_p(adjusted[id(c)])})"

    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += [f"| {name} | " + " | ".join(cell(c) for c in cs) + " |" for name, cs in found]
    lines += ["", f"p: exact McNemar; Holm: adjusted over the {len(tested)} tests of this table (statsmodels "
              "multipletests, method 'holm'); W-PGD: the difference only (coupled outcomes, no valid per-example "
              "test)."]
    return "\n".join(lines)


def column_at(w_entry, attack: str, budget: float) -> str | None:
    """The Wasserstein entry's column `<attack>@<budget>` (e.g. wpgd@0.1), matched numerically."""
    return next((k for k in w_entry.extra.get("per_attack") or {}
                 if k.startswith(f"{attack}@") and abs(float(k.split("@")[1]) - budget) < 1e-9), None)


def pgd20_alone(w_entry, eps: float) -> float | None:
    """PGD-20 accuracy on every example, from the Wasserstein suite's pointwise reference at ε = δ
    (the pointwise entry's cascade ran PGD-20 only on what AutoAttack left)."""
    column = column_at(w_entry, "pgd20", eps)
    value = None if column is None else w_entry.extra["per_attack"][column]
    return None if value is None else float(value)


def masking_screen(models: list[tuple[str, Any, Any]], screen_pp: float, reference: str,
                   check_all: bool = False) -> list[dict[str, Any]]:
    """Per model (name, pointwise entry, Wasserstein entry): PGD-20 alone, A_rob, and their gap in pp.
    A gap above `screen_pp` means AutoAttack breaks much that PGD-20 misses: either PGD-20 is simply
    weaker (APGD's step-size schedule, the DLR loss) or the gradients are masked and only Square gets
    through. The check (AutoAttack's parts one by one) tells which; it runs on the flagged models and on
    the `reference` model (the control), whose gap is what an unmasked model of this kind shows, or on
    every model with `check_all` (the parts cost about a minute per model at this size)."""
    rows = []
    for name, aa, w in models:
        pgd = pgd20_alone(w, aa.eps)
        gap = None if pgd is None or aa.a_rob is None else pgd - aa.a_rob
        flagged = gap is not None and gap > screen_pp
        rows.append({"name": name, "pgd20": pgd, "a_rob": aa.a_rob, "gap": gap, "flagged": flagged,
                     "check": flagged or name == reference or check_all})
    return rows


def black_box_only(per_example_csv: Path, attacks: list[str]) -> tuple[int, int]:
    """(examples broken by a black-box attack that every white-box attack missed, examples) from an
    independent-mode per-example file: the count the engine's black-box vs white-box check makes."""
    import csv

    from adt_finetune.attacks import ATTACKS

    black = [a for a in attacks if ATTACKS[a].black_box]
    white = [a for a in attacks if not ATTACKS[a].black_box]
    with open(per_example_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    # a clean error has every flag 0, so it never counts
    k = sum(1 for r in rows if all(r[a] == "1" for a in white) and any(r[a] == "0" for a in black))
    return k, len(rows)


def masking_text(study: Study, rows: list[dict[str, Any]]) -> str:
    """Markdown: the screen over every model, then AutoAttack's parts on the checked ones, each model's
    black-box-only rate tested against the control's."""
    from adt_finetune import leaderboard
    from adt_finetune.leaderboard.compare import format_p

    m = study.s.masking
    checked = ("every model is checked" if m.get("check_all") else
               f"flagged models are checked, as is the control (`{study.reference_run()}`) for reference")
    lines = [f"PGD-20 alone vs A_rob (AutoAttack + PGD-20 + CW) on the {study.s.n_examples} evaluated images; "
             f"a gap above {float(m['screen_pp']):g} pp is flagged; {checked}.", "",
             "| model | PGD-20 alone | A_rob | gap (pp) | checked |", "|---|---:|---:|---:|---|"]

    def pct(v: float | None, fmt: str = ".1f") -> str:
        return "—" if v is None else format(v, fmt)

    for r in rows:
        mark = "flagged" if r["flagged"] else ("yes" if r["check"] else "")
        lines.append(f"| {r['name']} | {pct(r['pgd20'])} | {pct(r['a_rob'])} | {pct(r['gap'], '+.1f')} | {mark} |")
    parts = [r["name"] for r in rows if r["check"] and study.entry_path(f"{r['name']}_parts").exists()]
    if not parts:
        return "\n".join(lines)
    from scipy.stats import fisher_exact

    attacks = [a.strip() for a in str(m["attacks"]).split(",") if a.strip()]
    found = {n: black_box_only(study.entry_path(f"{n}_parts").with_suffix(".per-example.csv"), attacks)
             for n in parts}
    # The control's runs of the first scope, pooled: how often Square alone breaks an unmasked model here.
    first_scope = next(iter(study.s.seeds))
    control = [j.run_name for j in study.s.jobs if (j.method, j.loss) == study.s.control and j.scope == first_scope
               and j.run_name in found]
    k_c, n_c = sum(found[c][0] for c in control), sum(found[c][1] for c in control)
    alpha = 0.05 / len(parts)
    lines += ["", f"AutoAttack's parts one by one (standard parameters, independent mode, first {int(m['n_examples'])} "
              "test images). *Square only*: examples broken by gradient-free Square that every white-box attack "
              f"missed. *p*: one-sided Fisher exact test of that rate against the control's runs pooled ({k_c} of "
              f"{n_c}); *masked* when p < 0.05 / {len(parts)} (Bonferroni over the models checked). The engine's own "
              "black-box vs white-box check (at most max(2, 1% of n) such examples) is stricter: Square, a strong "
              "attack, breaks a few such examples of healthy models too, so at n = 200 it also fires on some of them.",
              "", "| model | clean | " + " | ".join(attacks) + " | Square only | p | verdict |",
              "|---|---:|" + "---:|" * len(attacks) + "---:|---:|---|"]
    for n in parts:
        e = leaderboard.read_entry(study.entry_path(f"{n}_parts"), study.s.dataset, THREAT_MODEL)
        k, total = found[n]
        p = float(fisher_exact([[k, total - k], [k_c, n_c - k_c]], alternative="greater").pvalue) if n_c else None
        verdict = "**masked**" if p is not None and p < alpha else "ok"
        cells = [pct(e.attack_value(a)[0]) for a in attacks]
        lines.append(f"| {n} | {pct(e.clean)} | " + " | ".join(cells) +
                     f" | {k} ({100 * k / total:.1f}%) | {format_p(p)} | {verdict} |")
    return "\n".join(lines)


def baseline_text(entries: dict[str, list]) -> str:
    """The base model's row: clean, PGD-20 alone (the Wasserstein suite runs it independently at
    ε = δ; the cascade's PGD-20 only saw what AutoAttack left), AutoAttack, A_rob."""
    aa, w = entries["aa"][0], entries["w"][0]
    pgd = pgd20_alone(w, aa.eps)

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{v:.1f}%"

    return (f"Baseline, the base model before fine-tuning ({aa.n} test images, ε = {aa.eps_label}): clean "
            f"{pct(aa.clean)}, PGD-20 {pct(pgd)}, AutoAttack {pct(aa.autoattack)}, A_rob {pct(aa.a_rob)}.")


def rerun_text(study: Study, entries: dict[str, list]) -> str:
    """Which rows are new, which were reused, and whether the base reproduced the reused entries' base."""
    import csv

    s = study.s
    new = [j.run_name for j in s.jobs if study.selected(j)]
    lines = [f"Re-run here (`--only {','.join('/'.join(m) for m in sorted(study.only or ()))}`): "
             + ", ".join(f"`{n}`" for n in new) + "."]
    if study.reuse is None:
        return "\n".join(lines)
    lines.append(f"Every other run's entries are the committed ones from `{study.reuse}`, not re-run.")
    old = study.reuse / f"{BASE_NAME}_aa.per-example.csv"
    here = study.entry_path(f"{BASE_NAME}_aa").with_suffix(".per-example.csv")
    if old.exists() and here.exists():
        def flags(path: Path) -> dict[str, tuple[str, str]]:
            with open(path, newline="") as fh:
                return {r["index"]: (r["clean"], r["robust"]) for r in csv.DictReader(fh)}

        a, b = flags(old), flags(here)
        same = sum(a[k] == b.get(k) for k in a)
        verdict = ("the base reproduced: the reused rows compare against the same model" if same == len(a) else
                   "the base did NOT reproduce exactly, so the reused rows were fine-tuned from a different "
                   "base than the re-run ones: compare re-run rows with each other (and the base), and re-run "
                   "the control with --only to compare against it")
        lines.append(f"The regenerated base agrees with the reused entries' base on {same} of {len(a)} images "
                     f"(clean and A_rob outcome): {verdict}.")
    return "\n".join(lines)


def wdat_text(study: Study) -> str:
    """The wdat runs' per-epoch diagnostics (run.json) and what is the paper's and what is ours."""
    s = study.s
    lines = ["`wdat` is W-DAT as the distributional fine-tuning paper (arXiv:2502.09352) summarises it: the "
             "TRADES-style loss, each image's l∞ budget from the first-order split of the W₂ budget δ "
             "(δᵢ ∝ ‖∇ₓJ(xᵢ)‖₁/Υ) and PGD inside it; Υ recomputed on the data at an update rate. Ours (guesses, "
             "docs/methods.md \"wdat\"): δ = ε, J = ReDLR, Υ over the first 10,000 training images (here the "
             f"{s.train_subset or 'whole'} fine-tuning images) every 100 steps, a per-image cap of 2δ, 10 PGD "
             "steps, β = 6, and this study's 2-epoch budget; the paper's protocol (re-initialised head or a "
             "small weight perturbation, long training on the full set) is not used here, every method getting "
             "the same budget.", "",
             "| run | epoch | Υ | budget median | 95th pct | max | beyond ε | at the cap |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for job in s.jobs:
        if job.method != "wdat":
            continue
        path = study.ws.runs_dir / job.run_name / "run.json"
        diags = json.loads(path.read_text()).get("diagnostics", []) if path.exists() else []
        for k, d in enumerate(diags, start=1):
            if "share_beyond_eps" not in d:
                continue  # a run of the earlier wdat: no budget distribution recorded
            lines.append(f"| {job.run_name} | {k} | {d.get('upsilon', float('nan')):.3g} | "
                         f"{d['budget_median']:.4f} | {d['budget_p95']:.4f} | {d['budget_max']:.4f} | "
                         f"{100 * d['share_beyond_eps']:.1f}% | {100 * d['share_capped']:.1f}% |")
    return "\n".join(lines)


def stage_totals(times: dict[str, float]) -> str:
    """'base 21.3, fine-tuning 51.6, ...; in all 400.0' (minutes) from the per-stage seconds."""
    groups = {"base": 0.0, "fine-tuning": 0.0, "AutoAttack + PGD-20 + CW": 0.0, "Wasserstein suite": 0.0,
              "masking check": 0.0, "bench": 0.0, "publish": 0.0}
    for key, seconds in times.items():
        stage, _, what = key.partition(":")
        if stage in ("train", "heldout"):
            group = "base" if what.startswith("base-") else "fine-tuning"
        elif stage == "eval":
            group = {"aa": "AutoAttack + PGD-20 + CW", "w": "Wasserstein suite",
                     "parts": "masking check"}.get(what.rsplit("_", 1)[-1], "publish")
        else:
            group = stage if stage in groups else "publish"
        groups[group] += seconds
    return ", ".join(f"{k} {v / 60:.1f}" for k, v in groups.items() if v) + f"; in all {sum(times.values()) / 60:.1f}"


def readme_text(study: Study, entries: dict[str, list], wall_s: float) -> str:
    from adt_finetune import leaderboard

    s = study.s
    hist = json.loads(study.base_path.read_text()) if study.base_path.exists() else {"rounds": []}
    rounds = " → ".join(f"{100 * r['heldout_pgd20']:.1f}" for r in hist["rounds"])
    lines = [
        "# Fine-tuning a robust Fashion-MNIST model: ADT vs. continued adversarial training",
        "",
        "Generated by `scripts/study_robust.py` from `recipes/studies/study-robust-fmnist.yaml`; do not edit by "
        "hand. Regenerate with:", "", f"    {study.command}", "",
        f"Base: `{s.base['arch']}` {s.base['arch_kwargs']}, PGD-AT from scratch, rounds of "
        f"{s.base['round_epochs']} epoch(s); held-out PGD-20 (%) per round: {rounds or '—'}; best: "
        f"{hist.get('best', '—')}. Fine-tuning: {s.epochs} epoch(s) × {s.train_subset or 'all'} images, batch "
        f"{s.batch_size}, SGD, cosine schedule, lr {s.lr}. Evaluation: first {s.n_examples} test images, "
        f"{s.attacks} ({s.mode}) and the Wasserstein suite at budgets {s.w_budgets}.",
        "", f"Stage time (minutes of one process each; the trainer and an `--eval-worker` ran side by side, "
        f"device {s.device}): {stage_totals(study.times)}. Wall time of the last invocation: {wall_s / 60:.1f} min.",
        "",
        baseline_text(entries), "",
    ]
    for scope in s.seeds:
        lines += [f"## Summary, scope {scope}: every method against the control", "",
                  summary(study, entries, scope), ""]
    lines += [
        "Accuracy in % (mean ± sd over seeds); B − A and its interval from the seed-averaged per-example "
        "outcomes; McNemar p per seed pair (exact, two-sided); step time × control from `adt-ft bench` "
        f"(bench-<scope>.json: same architecture, batch {s.batch_size}, generator width {s.gen_width}, "
        "timed round-robin in one run).", "",
        "## Against the base model (no fine-tuning)", "",
        "Each run's accuracy (%), its difference to the base in pp and the exact McNemar p (same images):", "",
        versus_base(study, entries), "",
        "## All entries", "",
        leaderboard.render(entries["aa"], fmt="markdown", title="AutoAttack + PGD-20 + CW (%)").rstrip(), "",
        leaderboard.render(entries["w"], fmt="markdown", title="Wasserstein suite (%)").rstrip(), "",
    ]
    if study.only is not None:
        lines += ["## What this invocation re-ran", "", rerun_text(study, entries), ""]
    if any(m == "wdat" for m, _ in s.methods):
        lines += ["## wdat", "", wdat_text(study), ""]
    if s.masking:
        lines += ["## Gradient-masking check", "", masking_text(study, study.masking_rows()), ""]
    for kind, title in (("aa", "pointwise attacks"), ("w", "Wasserstein suite")):
        for scope in s.seeds:
            text = comparisons(study, entries[kind], scope)
            if text:
                lines += [f"## Against the control ({'/'.join(s.control)}), scope {scope}, {title}", "", text, ""]
    lines += ["Budget (as read from the recipe):", "", "```json", json.dumps(s.budget(), indent=2), "```", "",
              "Stage times (s):", "", "| stage | seconds |", "|---|---:|",
              *[f"| {k} | {v:.0f} |" for k, v in study.times.items()], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workspace", default=None, help="study workspace (default study-robust-ws; smoke: under /tmp)")
    p.add_argument("--out", default=None, help="entries, table and plot (default leaderboard/robust-base; "
                   "smoke: under /tmp)")
    p.add_argument("--recipe", default=str(RECIPE), help="the study recipe (default %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny budget, to check the pipeline end to end")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-progress", action="store_true", help="no per-batch progress bars")
    p.add_argument("--only", default=None, help="run only these methods' runs (and the base), e.g. wdat/trades")
    p.add_argument("--reuse", default=None, help="with --only: take every other run's entries from this folder "
                   "(e.g. leaderboard/robust-base) for the write-up")
    p.add_argument("--eval-worker", action="store_true",
                   help="only evaluate, beside a process that runs the study: each model once its run has finished")
    args = p.parse_args(argv)

    s = load_settings(args.recipe, smoke=args.smoke)
    workspace = Path(args.workspace or (SMOKE_ROOT / "ws" if args.smoke else "study-robust-ws"))
    out = Path(args.out or (SMOKE_ROOT / "out" if args.smoke else Path("leaderboard") / "robust-base"))
    command = "python scripts/study_robust.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    study = Study(s, workspace, out, command, args.data_dir, progress=not args.no_progress)
    if args.only:
        study.only = {_method(m, Path(args.recipe)) for m in args.only.split(",") if m.strip()}
        unknown = study.only - set(s.methods)
        if unknown:
            sys.exit(f"error: --only {args.only}: {sorted(unknown)} not among the recipe's methods")
    if args.reuse:
        if not args.only:
            sys.exit("error: --reuse needs --only (which runs to re-run)")
        study.reuse = Path(args.reuse)
    study.log(f"study: base + {len(s.jobs)} runs + {2 * (len(s.jobs) + 1)} evaluations in {workspace}"
              f"{' (smoke)' if args.smoke else ''}")
    study.check_settings()
    t0 = time.perf_counter()
    if args.eval_worker:
        study.evaluate()
        study.check_masking()
        study.log(f"evaluations finished in {(time.perf_counter() - t0) / 60:.1f} min")
        return 0
    study.base()
    for job in s.jobs:
        if study.selected(job):
            study.train(job)
    copied = study.reuse_entries()
    if copied:
        study.log(f"reused {len(copied)} committed entries from {study.reuse}")
    study.evaluate()
    study.check_masking()
    study.bench()
    study.publish(time.perf_counter() - t0)
    study.log(f"study finished in {(time.perf_counter() - t0) / 60:.1f} min: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
