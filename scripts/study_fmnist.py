#!/usr/bin/env python
"""The CPU-scale Fashion-MNIST study (README, "The Fashion-MNIST study"), as one command.

    python scripts/study_fmnist.py [--workspace study-ws] [--out leaderboard/fashion-mnist/Linf] [--smoke]

Pretrains a standard SmallCNN (the quickstart's stand-in for a RobustBench model),
fine-tunes it with every method × scope of recipes/studies/study-fmnist.yaml,
evaluates the base model and every run with --suite paper on the same test images,
copies the leaderboard JSON (with each run's time per epoch under "adt_ft") and the
per-example CSVs into --out, and writes the Markdown table, budget, command and
wall time to <out>/../../README.md plus <out>/study.png.

Interrupted? Run the same command again: finished runs and written entries are
skipped, an unfinished run is resumed from its checkpoint, a half-done evaluation
continues from its saved batches.
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "studies" / "study-fmnist.yaml"
BASE_NAME = "study-SmallCNN"
DATASET, THREAT_MODEL = "fashion-mnist", "Linf"
SMOKE_ROOT = Path("/tmp/adt-ft-study-smoke")


@dataclass
class Job:
    method: str
    loss: str
    scope: str

    @property
    def run_name(self) -> str:
        return f"study-{self.method}-{self.loss}-{self.scope}"


@dataclass
class StudySettings:
    seed: int
    device: str
    pretrain_images: int
    pretrain_epochs: int
    width: int
    train_subset: int
    epochs: int
    batch_size: int
    gen_width: int
    lr: dict[str, float]
    scopes: list[str]
    methods: list[tuple[str, str]]
    suite: str
    mode: str
    n_examples: int
    eval_batch_size: int
    attack_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""

    @property
    def jobs(self) -> list[Job]:
        return [Job(m, loss, s) for s in self.scopes for m, loss in self.methods]

    def train_config(self, job: Job, data_dir: str | None = None):
        """The TrainConfig of one study run (model None: the workspace's current model, the study base)."""
        from adt_finetune.config import TrainConfig

        return TrainConfig(method=job.method, loss=job.loss, scope=job.scope, epochs=self.epochs,
                           batch_size=self.batch_size, train_subset=self.train_subset, gen_width=self.gen_width,
                           lr=self.lr[job.scope], seed=self.seed, device=self.device, run_name=job.run_name,
                           data_dir=data_dir)

    def budget(self) -> dict[str, Any]:
        return {"pretrain": {"images": self.pretrain_images, "epochs": self.pretrain_epochs, "width": self.width},
                "finetune": {"train_subset": self.train_subset, "epochs": self.epochs, "batch_size": self.batch_size,
                             "gen_width": self.gen_width, "lr": dict(self.lr)},
                "eval": {"suite": self.suite, "mode": self.mode, "n_examples": self.n_examples,
                         "attack_settings": self.attack_settings},
                "methods": [f"{m}/{loss}" for m, loss in self.methods], "scopes": list(self.scopes),
                "seed": self.seed, "device": self.device}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_settings(path: str | Path = RECIPE, smoke: bool = False) -> StudySettings:
    """The study recipe as settings; `smoke` overlays its `smoke:` section."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the study recipe must be a mapping")
    if smoke:
        data = _merge(data, data.get("smoke") or {})
    pre, ft, ev = data["pretrain"], data["finetune"], data["eval"]
    methods = []
    for item in data["methods"]:
        method, _, loss = str(item).partition("/")
        if not loss:
            raise ValueError(f"{path}: method {item!r} must be written method/loss (e.g. exp-am/ce)")
        methods.append((method.strip(), loss.strip()))
    lr = ft["lr"]
    lr = {s: float(lr) for s in data["scopes"]} if not isinstance(lr, dict) else {k: float(v) for k, v in lr.items()}
    return StudySettings(
        seed=int(data["seed"]), device=str(data.get("device", "cpu")),
        pretrain_images=int(pre["images"]), pretrain_epochs=int(pre["epochs"]), width=int(pre["width"]),
        train_subset=int(ft["train_subset"]), epochs=int(ft["epochs"]), batch_size=int(ft["batch_size"]),
        gen_width=int(ft["gen_width"]), lr=lr, scopes=[str(s) for s in data["scopes"]], methods=methods,
        suite=str(ev["suite"]), mode=str(ev["mode"]), n_examples=int(ev["n_examples"]),
        eval_batch_size=int(ev.get("batch_size", 256)),
        attack_settings={k: dict(v) for k, v in (ev.get("attack_settings") or {}).items()},
        description=" ".join(str(data.get("description", "")).split()))


# ---------------------------------------------------------------- stages

class Study:
    def __init__(self, s: StudySettings, workspace: Path, out: Path, readme: Path, command: str,
                 data_dir: str | None, progress: bool):
        from rich.console import Console

        from adt_finetune.workspace import Workspace

        self.s, self.ws, self.out, self.readme, self.command = s, Workspace(workspace), out, readme, command
        self.data_dir, self.progress = data_dir, progress
        self.console = Console(highlight=False)
        self.times_path = self.ws.root / ".adt-ft" / "study-times.json"
        self.times: dict[str, float] = json.loads(self.times_path.read_text()) if self.times_path.exists() else {}
        self.stages = 1 + 1 + 2 * len(s.jobs) + 1
        self.done = 0

    def _stage(self, key: str, text: str, skip_reason: str | None, fn) -> Any:
        from adt_finetune.utils import atomic_write_json

        self.done += 1
        head = f"[{self.done}/{self.stages}] {text}"
        if skip_reason:
            self.console.print(f"{head}: [dim]skipped ({skip_reason})[/dim]")
            return None
        self.console.print(f"{head} ...")
        t = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - t
        self.times[key] = self.times.get(key, 0.0) + seconds  # a resumed stage adds to its earlier part
        atomic_write_json(self.times_path, self.times)
        self.console.print(f"{head}: [green]done[/green] in {seconds:.0f}s")
        return value

    def check_settings(self) -> None:
        """Refuse to mix budgets in one workspace: skipped stages would silently keep the old one."""
        from adt_finetune.utils import atomic_write_json

        path = self.ws.root / ".adt-ft" / "study-settings.json"
        budget = json.loads(json.dumps(self.s.budget()))
        if path.exists():
            if json.loads(path.read_text()) != budget:
                sys.exit(f"error: {self.ws.root} holds a study with another budget ({path}): use a new --workspace")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, budget)

    def entry_path(self, entry: str) -> Path:
        return self.ws.leaderboard_dir / DATASET / THREAT_MODEL / f"{entry}.json"

    def pretrain(self) -> None:
        from adt_finetune import zoo
        from adt_finetune.quickstart import SMALL_CNN, QuickstartSettings, _pretrain
        from adt_finetune.workspace import ModelRef

        path = self.ws.model_path(DATASET, THREAT_MODEL, BASE_NAME)
        ref = ModelRef(name=BASE_NAME, arch=SMALL_CNN, dataset=DATASET, threat_model=THREAT_MODEL, path=str(path),
                       source="quickstart", arch_kwargs={"width": self.s.width})

        def work():
            qs = QuickstartSettings(width=self.s.width, pretrain_images=self.s.pretrain_images,
                                    pretrain_epochs=self.s.pretrain_epochs, seed=self.s.seed)
            model = _pretrain(qs, self.data_dir, self.ws.root, lambda line: self.console.print(line))
            zoo.register_model(model, name=BASE_NAME, arch=SMALL_CNN, arch_kwargs={"width": self.s.width},
                               dataset=DATASET, workspace=self.ws.root, source="quickstart")

        self._stage("pretrain", f"pretrain a standard SmallCNN(width {self.s.width}) on {self.s.pretrain_images} "
                    f"images for {self.s.pretrain_epochs} epoch(s)", "model exists" if path.exists() else None, work)
        # Runs train the current model; make sure that is the study base even when the stage was skipped.
        self.ws.set_current_model(ref)

    def _eval_kwargs(self) -> dict[str, Any]:
        s = self.s
        return dict(suite=s.suite, mode=s.mode, n_examples=s.n_examples, batch_size=s.eval_batch_size, seed=s.seed,
                    device=s.device, attack_settings=s.attack_settings, data_dir=self.data_dir,
                    workspace=self.ws.root, resume=True)

    def _evaluate(self, **fields):
        """`evaluate_workspace` of the study's settings and `fields`, with the study's progress."""
        from adt_finetune.cli.report import reporter
        from adt_finetune.evaluation import EvalRequest, evaluate_workspace

        return evaluate_workspace(EvalRequest(**self._eval_kwargs(), **fields), reporter=reporter(self.progress))

    def eval_base(self) -> None:
        from adt_finetune.quickstart import SMALL_CNN

        entry = f"{BASE_NAME}_{self.s.suite}"

        def work():
            if self.ws.latest_run() is None:  # the current model: its entry names the model, not a file path
                self._evaluate(entry=entry)
            else:  # resumed after runs exist: only the explicit file form still reaches the base model
                self._evaluate(model=str(self.ws.model_path(DATASET, THREAT_MODEL, BASE_NAME)), arch=SMALL_CNN,
                               arch_kwargs={"width": self.s.width}, dataset=DATASET, entry=entry)

        self._stage(f"eval:{entry}", f"eval the base model (--suite {self.s.suite}, {self.s.n_examples} images)",
                    "entry exists" if self.entry_path(entry).exists() else None, work)

    def train(self, job: Job) -> None:
        from adt_finetune.cli.report import reporter
        from adt_finetune.cli.train_cmd import print_summary
        from adt_finetune.errors import UserError
        from adt_finetune.run_folder import load_run
        from adt_finetune.training import train

        folder = self.ws.runs_dir / job.run_name
        skip = None
        resume = False
        if folder.exists():
            try:
                info = load_run(folder, self.ws.root, require_finished=False)
                skip = "finished" if info.finished else None
                resume = not info.finished and (folder / "checkpoint.pt").exists()
            except UserError:
                pass
            if not skip and not resume:  # started but never checkpointed: nothing worth keeping
                shutil.rmtree(folder)

        def work():
            if resume:
                result = train(None, workspace=self.ws.root, reporter=reporter(self.progress), resume=job.run_name)
            else:
                result = train(self.s.train_config(job, self.data_dir), workspace=self.ws.root,
                               reporter=reporter(self.progress))
            if self.progress:
                print_summary(result)

        verb = "resume" if resume else "train"
        self._stage(f"train:{job.run_name}", f"{verb} {job.run_name} ({self.s.epochs} epochs × "
                    f"{self.s.train_subset} images)", skip, work)

    def eval_run(self, job: Job) -> None:
        entry = f"{job.run_name}_{self.s.suite}"

        def work():
            record = self._evaluate(run=job.run_name, entry=entry)
            add_run_timing(record.json_path, self.ws.runs_dir / job.run_name)

        self._stage(f"eval:{entry}", f"eval {job.run_name} (--suite {self.s.suite}, {self.s.n_examples} images)",
                    "entry exists" if self.entry_path(entry).exists() else None, work)

    def publish(self, wall_s: float) -> None:
        from adt_finetune import leaderboard

        def work():
            self.out.mkdir(parents=True, exist_ok=True)
            src = self.ws.leaderboard_dir / DATASET / THREAT_MODEL
            names = [f"{BASE_NAME}_{self.s.suite}"] + [f"{j.run_name}_{self.s.suite}" for j in self.s.jobs]
            for name in names:
                for f in sorted(src.glob(f"{name}.*")):
                    if f.name in (f"{name}.json", f"{name}.per-example.csv"):
                        shutil.copy2(f, self.out / f.name)
            entries = [leaderboard.Entry(n, self.out / f"{n}.json", DATASET, THREAT_MODEL,
                                         json.loads((self.out / f"{n}.json").read_text())) for n in names]
            leaderboard.plot(entries, self.out / "study.png")
            self.readme.parent.mkdir(parents=True, exist_ok=True)
            from adt_finetune.utils import atomic_write_text

            atomic_write_text(self.readme, readme_text(self.s, entries, self.command, self.times, wall_s,
                                                       self.out, self.readme))

        self._stage("publish", f"copy entries to {self.out}, write {self.readme.name} and study.png", None, work)


def add_run_timing(json_path: Path, run_dir: Path) -> None:
    """Put the run's training cost under the entry's "adt_ft" key (evaluation copies epochs but not times)."""
    from adt_finetune.utils import atomic_write_json

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


def readme_text(s: StudySettings, entries, command: str, times: dict[str, float], wall_s: float,
                out: Path, readme: Path) -> str:
    from adt_finetune import leaderboard

    def rel(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(readme.parent.resolve()))
        except ValueError:
            return str(p)

    timing_rows = []
    for e in leaderboard.sort_entries(entries):
        x = e.extra
        if x.get("run_id"):
            t = x.get("mean_time_per_epoch_s")
            timing_rows.append(f"| {x.get('method')} | {x.get('loss')} | {x.get('scope')} | {x.get('epochs')} | "
                               f"{'—' if t is None else f'{t:.1f}'} | {e.clean:.2f} | {e.a_rob:.2f} |")
    feature = s.attack_settings.get("feature", {})
    compute = sum(times.values())
    lines = [
        "# Fashion-MNIST study: ADT vs. adversarial training, CPU scale",
        "",
        "Generated by `scripts/study_fmnist.py` from `recipes/studies/study-fmnist.yaml`; do not edit by hand.",
        "",
        "Regenerate with:",
        "",
        f"    {command}",
        "",
        f"A standard SmallCNN (width {s.width}) pretrained on {s.pretrain_images} Fashion-MNIST images for "
        f"{s.pretrain_epochs} epoch(s), then fine-tuned by each method for {s.epochs} epoch(s) on the first "
        f"{s.train_subset} training images (batch {s.batch_size}, lr {s.lr}, generator width {s.gen_width}), "
        f"ε = 0.1. Every model is evaluated with `--suite {s.suite}` in {s.mode} mode on the first "
        f"{s.n_examples} test images. **The feature attack uses {feature.get('targets', 200)} targets per image "
        "instead of the paper's 200.**",
        "",
        f"Wall time: {wall_s / 60:.1f} min for the last invocation; {compute / 60:.1f} min of stage time in all "
        f"(device {s.device}).",
        "",
        leaderboard.render(entries, fmt="markdown", title="Robust accuracy (%), best AutoAttack first").rstrip(),
        "",
        "### Training cost",
        "",
        "| method | loss | scope | epochs | s / epoch | clean | A_rob |",
        "|---|---|---|---:|---:|---:|---:|",
        *timing_rows,
        "",
        f"Entries (JSON with `adt_ft.time_per_epoch_s`, per-example CSVs): `{rel(out)}/`; "
        f"plot: `{rel(out / 'study.png')}`.",
        "",
        "Budget (as read from the recipe):",
        "",
        "```json",
        json.dumps(s.budget(), indent=2),
        "```",
        "",
        "Stage times (s):",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {k} | {v:.0f} |" for k, v in times.items()],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workspace", default=None, help="study workspace (default study-ws; smoke: under /tmp)")
    p.add_argument("--out", default=None, help="where the entries go (default leaderboard/fashion-mnist/Linf; "
                   "smoke: under /tmp)")
    p.add_argument("--readme", default=None, help="the generated README (default: <out>/../../README.md)")
    p.add_argument("--recipe", default=str(RECIPE), help="the study recipe (default %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny budget, to check the pipeline end to end")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-progress", action="store_true", help="no per-batch progress bars")
    args = p.parse_args(argv)

    s = load_settings(args.recipe, smoke=args.smoke)
    workspace = Path(args.workspace or (SMOKE_ROOT / "ws" if args.smoke else "study-ws"))
    out = Path(args.out or (SMOKE_ROOT / "leaderboard" / DATASET / THREAT_MODEL if args.smoke
                            else Path("leaderboard") / DATASET / THREAT_MODEL))
    readme = Path(args.readme) if args.readme else out.parent.parent / "README.md"
    command = "python scripts/study_fmnist.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))

    study = Study(s, workspace, out, readme, command, args.data_dir, progress=not args.no_progress)
    study.console.print(f"study: {len(s.jobs)} runs + {len(s.jobs) + 1} evaluations in {workspace}"
                        f"{' (smoke)' if args.smoke else ''}; feature attack with "
                        f"{s.attack_settings.get('feature', {}).get('targets', 200)} targets (paper: 200)")
    study.check_settings()
    t0 = time.perf_counter()
    study.pretrain()
    study.eval_base()
    for job in s.jobs:
        study.train(job)
    for job in s.jobs:
        study.eval_run(job)
    study.publish(time.perf_counter() - t0)
    study.console.print(f"study finished in {(time.perf_counter() - t0) / 60:.1f} min: {out}, {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
