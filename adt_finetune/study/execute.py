"""Running one job of a study: the base model, a fine-tuning run, an evaluation, a benchmark.

Every job is resumable: the base model's training rounds are recorded one by one, a run continues
from its checkpoint, an evaluation from its saved batches. A job reads the base model from the
workspace by file (or zoo name), never through the workspace's "current model", so workers running
side by side cannot change what another one trains or evaluates.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from ..config import TrainConfig
from ..errors import UserError
from ..progress import Reporter
from ..run_folder import load_run
from ..utils import atomic_write_json, child_env
from ..workspace import Workspace
from .jobs import Job, Progress, entry_name
from .masking import masking_screen
from .spec import StudySpec

SMALL_CNN = "adt_finetune.models.small:SmallCNN"


class JobRunner:
    def __init__(self, spec: StudySpec, ws: Workspace, *, data_dir: str | None = None,
                 reporter: Callable[[], Reporter | None] = lambda: None, log: Callable[[str], None] = print,
                 offline: bool = False):
        self.spec, self.ws, self.data_dir, self.reporter, self.log = spec, ws, data_dir, reporter, log
        self.offline = offline
        self.progress = Progress(spec, ws)

    def run(self, job: Job) -> None:
        {"base": self.base, "train": self.train, "eval": self.evaluate, "bench": self.bench}[job.kind](job)

    # ---------------------------------------------------------------- the base model

    def base_arch(self) -> tuple[str, dict[str, Any]]:
        b = self.spec.base
        if self.spec.base_kind == "pretrain":
            return SMALL_CNN, {"width": int(b["pretrain"]["width"])}
        section = b[self.spec.base_kind] if self.spec.base_kind == "train" else b
        return str(section["arch"]), dict(section.get("arch_kwargs") or {})

    def base_model_args(self) -> dict[str, Any]:
        """How train and eval name the base model: a zoo name, or its file in the workspace."""
        if self.spec.base_kind == "zoo":
            return {"model": str(self.spec.base["zoo"]), "dataset": self.spec.dataset}
        arch, kwargs = self.base_arch()
        return {"model": str(self.progress.base_model_path()), "arch": arch, "arch_kwargs": kwargs,
                "dataset": self.spec.dataset}

    def base(self, job: Job) -> None:
        from .. import zoo

        s, kind = self.spec, self.spec.base_kind
        marker = self.progress.state / "base.json"
        history = json.loads(marker.read_text()) if marker.exists() else {"rounds": []}
        if kind == "zoo":
            zoo.pull(str(s.base["zoo"]), dataset=s.dataset, threat_model=s.threat_model, workspace=self.ws.root,
                     download=not self.offline, progress=False)
        elif kind == "checkpoint":
            arch, kwargs = self.base_arch()
            path = Path(str(s.base["checkpoint"])).expanduser()
            path = path if path.is_absolute() else s.path.parent / path
            _, model = zoo.pull_file_model(path, arch, dataset=s.dataset, threat_model=s.threat_model,
                                           workspace=self.ws.root, name=s.base_name, arch_kwargs=kwargs)
            self._register(model)
        elif kind == "pretrain":
            self._register(self._pretrain())
        else:
            from .base_rounds import train_rounds

            best = train_rounds(self, history, marker)
            self._register(best)
        history["ready"] = True
        atomic_write_json(marker, history)

    def _register(self, model) -> None:
        from .. import zoo

        arch, kwargs = self.base_arch()
        zoo.register_model(model, name=self.spec.base_name, arch=arch, arch_kwargs=kwargs, dataset=self.spec.dataset,
                           threat_model=self.spec.threat_model, workspace=self.ws.root, source=f"study {self.spec.name}",
                           make_current=False)

    def _pretrain(self):
        from ..quickstart import QuickstartSettings, _pretrain

        p = self.spec.base["pretrain"]
        qs = QuickstartSettings(width=int(p["width"]), pretrain_images=int(p["images"]),
                                pretrain_epochs=int(p["epochs"]), seed=self.spec.seed)
        return _pretrain(qs, self.data_dir, self.ws.root, self.log)

    # ---------------------------------------------------------------- fine-tuning

    def train_config(self, job: Job) -> TrainConfig:
        s, d = self.spec, job.detail
        arm = d["arm"]
        values = {k: v for k, v in s.finetune.items() if k not in ("lr", "nproc")}
        values.update(dict(arm.settings))
        base = self.base_model_args()
        cfg = TrainConfig(model=base["model"], arch=base.get("arch"), arch_kwargs=base.get("arch_kwargs"),
                          dataset=s.dataset, method=arm.method, loss=arm.loss, scope=d["scope"], lr=s.lr(d["scope"]),
                          seed=d["seed"], device=s.device, run_name=job.model, data_dir=self.data_dir, eps=s.eps)
        return cfg.updated(values)

    def train(self, job: Job) -> None:
        self.run_training(job.model, lambda: self.train_config(job), nproc=int(self.spec.finetune.get("nproc", 1)))

    def run_training(self, name: str, config: Callable[[], TrainConfig], nproc: int = 1) -> None:
        """Train run `name`, or continue it from its checkpoint; a folder that never checkpointed starts
        over. With `nproc` > 1 the run trains under torchrun (one process per device)."""
        from ..training import train

        folder = self.ws.runs_dir / name
        if folder.exists():
            try:
                info = load_run(folder, self.ws.root, require_finished=False)
                if info.finished:
                    return
                if (folder / "checkpoint.pt").exists():
                    if nproc > 1:
                        return self._torchrun(["--resume", name], nproc)
                    train(None, workspace=self.ws.root, reporter=self.reporter(), resume=name)
                    return
            except UserError:
                pass
            shutil.rmtree(folder)
        if nproc > 1:
            return self._torchrun(["--recipe", str(self._recipe_file(name, config()))], nproc)
        train(config(), workspace=self.ws.root, reporter=self.reporter())

    def _recipe_file(self, name: str, cfg: TrainConfig) -> Path:
        """The run's settings as a recipe that `adt-ft train --recipe` reads back unchanged."""
        import yaml

        from ..utils import atomic_write_text

        data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items() if v is not None}
        path = self.progress.state / "recipes" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=True))
        return path

    def _torchrun(self, args: list[str], nproc: int) -> None:
        """`adt-ft train ARGS --nproc N` (torchrun) in a child process; its failure is this job's."""
        import subprocess
        import sys

        command = [sys.executable, "-m", "adt_finetune", "train", *args, "--nproc", str(nproc),
                   "--workspace", str(self.ws.root), "--no-progress"]
        code = subprocess.run(command, env=child_env()).returncode  # never imports from the current folder
        if code:
            raise UserError(f"training under torchrun ({nproc} processes) exited with code {code}")

    # ---------------------------------------------------------------- evaluation

    def eval_kwargs(self, job: Job) -> dict[str, Any] | None:
        """evaluate_workspace's arguments for an evaluation job (None: the masking screen skips it)."""
        s, kind = self.spec, job.detail["kind"]
        p = s.pointwise
        kwargs: dict[str, Any] = dict(n_examples=p["n_examples"], batch_size=p["batch_size"], seed=s.seed,
                                      device=s.device, data_dir=self.data_dir, workspace=self.ws.root, resume=True,
                                      entry=entry_name(s, job.model, kind), eps=s.eps)
        if kind == "pointwise":
            kwargs.update(mode=p["mode"], attack_settings={k: dict(v) for k, v in
                                                           (p.get("attack_settings") or {}).items()})
            kwargs.update({"attacks": p["attacks"]} if "attacks" in p else {"suite": p["suite"]})
        elif kind == "w":
            kwargs.update(suite="wasserstein", budgets=str(s.wasserstein["budgets"]))
        elif kind == "parts":
            m = s.masking
            if not m.get("check_all", False) and not self._screened_in(job.model):
                return None
            kwargs.update(attacks=str(m["attacks"]), mode="independent", n_examples=int(m["n_examples"]))
        if job.model == s.base_name:
            kwargs.update(self.base_model_args())
        else:
            kwargs.update(run=job.model)
        return kwargs

    def _screened_in(self, model: str) -> bool:
        from ..leaderboard import read_entry

        def read(m: str, kind: str):
            path = self.progress.entry_path(entry_name(self.spec, m, kind))
            if not path.exists():  # a partial re-run (--only): the other models' entries are in the report folder
                path = Path(self.spec.out) / path.name
            return read_entry(path, self.spec.dataset, self.spec.threat_model)

        rows = masking_screen([(m, read(m, "pointwise"), read(m, "w")) for m in self.spec.models()],
                              float(self.spec.masking["screen_pp"]), reference_run(self.spec), False)
        return next(r["check"] for r in rows if r["name"] == model)

    def evaluate(self, job: Job) -> None:
        from ..evaluation import EvalRequest, evaluate_workspace

        if job.detail["kind"] == "audit":
            return self.audit(job)
        kwargs = self.eval_kwargs(job)
        if kwargs is None:
            atomic_write_json(self.progress.skip_path(job), {"reason": "not flagged by the masking screen"})
            return
        record = evaluate_workspace(EvalRequest(**kwargs), reporter=self.reporter())
        if job.model != self.spec.base_name:
            add_run_timing(record.json_path, self.ws.runs_dir / job.model)

    def audit(self, job: Job) -> None:
        """`adt-ft audit` of the model on the study file's `audit.n_examples` (default 200) first test
        images, recorded in its pointwise entry; a run's base model is the transfer check's surrogate."""
        from ..evaluation.audit_run import audit_workspace

        a, s = self.spec.audit or {}, self.spec
        target = {"run": job.model} if job.model != s.base_name else {
            k: v for k, v in self.base_model_args().items() if k in ("model", "arch", "arch_kwargs", "dataset")}
        audit_workspace(**target, entry=entry_name(s, job.model, "pointwise"), n_examples=int(a.get("n_examples", 200)),
                        eps=s.eps, data_dir=self.data_dir, device=s.device, seed=s.seed,
                        batch_size=int(a.get("batch_size", s.pointwise["batch_size"])),
                        checks=list(a["checks"]) if a.get("checks") else None, workspace=self.ws.root,
                        reporter=self.reporter())

    # ---------------------------------------------------------------- cost

    def bench(self, job: Job) -> None:
        from ..bench import run_benchmark

        s, scope = self.spec, job.detail["scope"]
        arch, kwargs = self.base_arch()
        overrides = {k: v for k, v in s.finetune.items() if k in ("gen_width",)}
        result = run_benchmark(arch, dataset=s.dataset, arch_kwargs=kwargs,
                               methods=list(dict.fromkeys(a.method for a in s.arms)),
                               losses=sorted({a.loss for a in s.arms}), attacks=[],
                               batch_size=int(s.finetune.get("batch_size", 128)), device=s.device,
                               steps=int(s.bench.get("steps", 5)), warmup=int(s.bench.get("warmup", 1)), seed=s.seed,
                               config_overrides={**overrides, "scope": scope}, strict=True)
        result.save_json(self.progress.bench_path(scope))


def reference_run(spec: StudySpec) -> str:
    """The control's first run: the masking check's reference model."""
    return next(name for name, arm, _, _ in spec.runs() if arm == spec.control)


def add_run_timing(json_path: Path, run_dir: Path) -> None:
    """Put the run's training cost under the entry's "adt_ft" key (evaluation copies epochs but not times)."""
    meta = json.loads((run_dir / "run.json").read_text())
    data = json.loads(Path(json_path).read_text())
    times = [float(t) for t in meta.get("time_per_epoch_s") or []]
    data["adt_ft"].update({
        "time_per_epoch_s": times,
        "mean_time_per_epoch_s": round(sum(times) / len(times), 3) if times else None,
        "train_examples": meta.get("train_examples"),
        "train_device": meta.get("device"),
    })
    atomic_write_json(json_path, data)


