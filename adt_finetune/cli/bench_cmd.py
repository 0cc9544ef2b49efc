"""`adt-ft bench`: throughput, pass counts, memory and cost-model ratios of every method and attack."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from ..bench.bench_config import ATTACK_BASELINE, DEFAULT_ARCH, METHOD_BASELINE, default_dataset, parse_list
from ..progress import Reporter
from .common import DeviceOpt, WorkspaceOpt, attack_names, console, err_console, method_names

if TYPE_CHECKING:
    from rich.table import Table

    from ..bench import BenchResult


class _Steps(Reporter):
    """Which item is being set up or timed, dim on stderr (stdout keeps the table)."""

    def message(self, text: str) -> None:
        from rich.text import Text

        err_console.print(Text(text, style="dim"), highlight=False, soft_wrap=True)


def bench_table(result: "BenchResult") -> "Table":
    """The rows as a rich Table (what `adt-ft bench` prints)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text  # names and error notes are data, not markup

    m = result.meta
    title = (f"{m['arch']} on {m['dataset']} shapes {tuple(m['input_shape'])}, batch {m['batch_size']}, "
             f"{m['dtype']}{', channels-last' if m['channels_last'] else ''}"
             f"{', compiled' if m['compile'] else ''} — {m['device']['name']}")
    t = Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    notes = any(r.note for r in result.rows)
    t.add_column("item", no_wrap=True)
    t.add_column("loss", no_wrap=True)
    cpu = m["device"]["type"] == "cpu"
    for col in ("img/s", "ms/step", "f/b", "+MB" if cpu else "MB", "ratio", *(["cpu×"] if cpu else []), "pred.",
                "ratio÷pred.", "TFLOP/s"):
        t.add_column(col, justify="right", no_wrap=True)
    if notes:
        t.add_column("note", overflow="fold")

    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    kind = None
    for r in result.rows:
        if kind is not None and r.kind != kind:
            t.add_section()
        kind = r.kind
        cells = [Text(r.name), r.loss or "", f(r.images_per_s, ",.1f"),
                 f(None if r.step_time_s is None else 1e3 * r.step_time_s, ",.1f"),
                 "—" if r.forward_passes is None else f"{r.forward_passes}/{r.backward_passes}",
                 f(r.peak_mem_mb, ",.0f"), f(r.ratio, ".2f"), *([f(r.cpu_ratio, ".2f")] if cpu else []),
                 f(r.predicted_ratio, ".2f"),
                 f(None if r.ratio is None or not r.predicted_ratio else r.ratio / r.predicted_ratio, ".2f"),
                 f(r.tflops, ".2g")]
        t.add_row(*cells, *([Text(r.note)] if notes else []))
    caption = [f"ratio: wall time ÷ {METHOD_BASELINE}'s (methods), ÷ {ATTACK_BASELINE}'s (attacks)"
               + ("; cpu×: the same with process CPU time" if cpu else "")
               + "; pred.: FLOP cost model's ratio; ratio÷pred.: measured over predicted; f/b: classifier "
               "forward/backward passes per step; "
               + ("+MB: growth of resident memory over what earlier items left resident (0: the item fit in it)"
                  if cpu else "MB: peak memory"),
               f"torch {m['torch']}, {m['device']['threads']} threads",
               f"{m['steps']} timed steps after {m['warmup']} warm-up (median, items interleaved)",
               f"classifier {m['classifier_gflop_per_image']['forward']:.3g} GFLOP/image forward"]
    if m["config_overrides"]:
        caption.append("settings " + ", ".join(f"{k}={v}" for k, v in m["config_overrides"].items()))
    t.caption = Text("; ".join(caption))
    return t


def bench(
    arch: str = typer.Option(DEFAULT_ARCH, "--arch",
                             help="RobustBench zoo name or package.module:Class; built with random weights."),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="Input shapes and classes of this dataset \\[default: fashion-mnist for the "
                                "default arch, cifar10 otherwise]."),
    arch_kwargs: Optional[str] = typer.Option(
        None, "--arch-kwargs", help='JSON constructor arguments for module:Class, e.g. \'{"width": 64}\'.'),
    methods: Optional[str] = typer.Option(
        None, "--methods", help=f"Comma-separated training methods ({', '.join(method_names())}), or none "
                                "\\[default: all]."),
    losses: str = typer.Option("ce,trades", "--losses", help="Losses for the methods that take one."),
    attacks: Optional[str] = typer.Option(
        None, "--attacks", help=f"Comma-separated attacks ({', '.join(attack_names())}), or none "
                                "\\[default: fgsm,pgd20,pgd100,mim,cw on CPU; the paper suite's attacks on GPU]."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per step."),
    device: str = DeviceOpt,
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 (autocast) or fp16 (CUDA, GradScaler)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Channels-last memory format."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the classifier."),
    steps: int = typer.Option(5, "--steps", help="Timed steps (or attack batches) per item; the median is shown."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed steps first (at least the FLOP-counting one)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random weights, inputs and the items' randomness."),
    settings: List[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="Training setting for the methods (any 'adt-ft train' option), "
                                               "repeatable, e.g. --set gen_width=256 (the CPU default is 32)."),
    json_out: Optional[Path] = typer.Option(None, "--json", metavar="FILE", dir_okay=False,
                                            help="Also write the results as JSON here (a relative path "
                                                 "is inside the workspace)."),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Measure every training method and attack side by side on random inputs (no download).

    Per item: images/s, median step time, the classifier's forward/backward passes, peak memory, the step-time
    ratio to pgd-at (methods) or pgd20 (attacks) from this same run, the ratio a FLOP cost model predicts from the
    pass counts, and the achieved TFLOP/s.
    """
    from ..bench import parse_overrides, run_benchmark
    from ..utils import parse_json_object

    result = run_benchmark(
        arch,
        dataset=dataset or default_dataset(arch),
        methods=parse_list(methods),
        losses=parse_list(losses) or [],
        attacks=parse_list(attacks),
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        compile=compile,
        steps=steps,
        warmup=warmup,
        seed=seed,
        arch_kwargs=parse_json_object(arch_kwargs),
        config_overrides=parse_overrides(settings),
        reporter=_Steps(),
    )
    console.print(bench_table(result))
    if json_out is not None:
        json_out = json_out if json_out.expanduser().is_absolute() else workspace / json_out
        result.save_json(json_out)
        console.print(f"wrote {json_out}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
