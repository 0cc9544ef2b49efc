"""`adt-ft bench`: throughput, pass counts, memory and cost-model ratios of every method and attack."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .common import DeviceOpt, console, err_console


def register(app: typer.Typer) -> None:
    from ..bench import DEFAULT_ARCH

    @app.command("bench")
    def bench(
        arch: str = typer.Option(DEFAULT_ARCH, "--arch",
                                 help="RobustBench zoo name or package.module:Class; built with random weights."),
        dataset: Optional[str] = typer.Option(
            None, "--dataset", help="Input shapes and classes of this dataset \\[default: fashion-mnist for the "
                                    "default arch, cifar10 otherwise]."),
        arch_kwargs: Optional[str] = typer.Option(None, "--arch-kwargs",
                                                  help='JSON constructor arguments for module:Class, e.g. \'{"width": 64}\'.'),
        methods: Optional[str] = typer.Option(None, "--methods",
                                              help="Comma-separated training methods, or none \\[default: all]."),
        losses: str = typer.Option("ce,trades", "--losses", help="Losses for the methods that take one."),
        attacks: Optional[str] = typer.Option(
            None, "--attacks", help="Comma-separated attacks, or none \\[default: fgsm,pgd20,pgd100,mim,cw on CPU; "
                                    "the paper suite's attacks on GPU]."),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per step."),
        device: str = DeviceOpt,
        dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 (autocast) or fp16 (CUDA, GradScaler)."),
        channels_last: bool = typer.Option(False, "--channels-last", help="Channels-last memory format."),
        compile: bool = typer.Option(False, "--compile", help="torch.compile the classifier."),
        steps: int = typer.Option(5, "--steps", help="Timed steps (or attack batches) per item; the median is shown."),
        warmup: int = typer.Option(1, "--warmup", help="Untimed steps first (at least the FLOP-counting one)."),
        seed: int = typer.Option(0, "--seed"),
        settings: List[str] = typer.Option([], "--set", help="Training setting KEY=VALUE for the methods, "
                                                             "repeatable, e.g. --set gen_width=256 (the CPU "
                                                             "default is 32)."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here.",
                                                dir_okay=False),
    ) -> None:
        """Measure every training method and attack side by side on random inputs (no download).

        Per item: images/s, median step time, the classifier's forward/backward passes, peak memory, the step-time ratio to pgd-at (methods) or pgd20 (attacks) from this same run, the ratio a FLOP cost model predicts from the pass counts, and the achieved TFLOP/s.
        """
        from ..bench import parse_list, parse_overrides, run_benchmark
        from ..errors import UserError

        kwargs = None
        if arch_kwargs:
            try:
                kwargs = json.loads(arch_kwargs)
            except json.JSONDecodeError:
                raise UserError(f"--arch-kwargs {arch_kwargs!r} is not JSON: write e.g. '{{\"width\": 64}}'") from None
            if not isinstance(kwargs, dict):
                raise UserError("--arch-kwargs must be a JSON object of constructor arguments")
        result = run_benchmark(
            arch,
            dataset=dataset or ("fashion-mnist" if arch == DEFAULT_ARCH else "cifar10"),
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
            arch_kwargs=kwargs,
            config_overrides=parse_overrides(settings),
            progress=lambda msg: err_console.print(f"[dim]benchmarking {msg}…[/]", highlight=False),
        )
        console.print(result.table())
        if json_out is not None:
            result.save_json(json_out)
            console.print(f"wrote {json_out}", highlight=False)
