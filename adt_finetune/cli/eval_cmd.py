"""`adt-ft eval`: a thin layer over adt_finetune.evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from ..errors import UserError
from .common import DeviceOpt, WorkspaceOpt, attack_names, console, err_console


def parse_settings(items: List[str] | None) -> dict[str, dict[str, Any]]:
    """['autoattack.version=plus', 'feature.targets=50'] -> {'autoattack': {'version': 'plus'}, ...}.
    Values stay strings: each attack parses and validates its own settings."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        attack, dot, name = key.strip().partition(".")
        if not eq or not dot or not attack or not name:
            raise UserError(f"--set {item!r}: write ATTACK.SETTING=VALUE, e.g. autoattack.version=plus")
        out.setdefault(attack.lower(), {})[name.strip()] = value.strip()
    return out


# Sharded evaluation (docs/evaluation.md, "Sharded evaluation").
_SHARD = typer.Option(None, "--shard", help="K/N: evaluate only shard K of N (independent jobs, e.g. a SLURM array) "
                                            "and write a shard file; combine the N files with 'adt-ft merge'.")
_SHARD_DIR = typer.Option(None, "--shard-dir", file_okay=False,
                          help="Folder for --shard files (default: the workspace's partial-results folder).")
_CHUNK_SIZE = typer.Option(256, "--chunk-size", show_default=True,
                           help="Examples per chunk: shards take whole chunks and batch-level randomness is keyed to "
                                "them, so flags do not depend on the split (part of the evaluation, like --seed; "
                                "batches never exceed it).")
_AUDIT = typer.Option(False, "--audit", help="Then audit the evaluation on its first 200 images (see 'adt-ft audit') "
                                            "and record the verdicts in the entry.")

# --from-run first: under torchrun '--run' is an ambiguous prefix of torchrun's own --run-path and
# torchrun exits before adt-ft starts; '--run' stays for plain adt-ft.
_RUN = typer.Option(None, "--from-run", "--run", help="Run id or run folder (default: the latest run); --run is the "
                                                      "same outside torchrun.")
_NPROC = typer.Option(None, "--nproc", help="Evaluate on N processes on this machine: checks the device, then runs "
                                            "this command under 'torchrun --standalone --nproc-per-node N' (one per "
                                            "GPU).")

_AMP = typer.Option(False, "--amp", help="Run the fixed-step gradient attacks (fgsm, pgd, mim, cw) under bf16 "
                                 "autocast; verdicts are always the fp32 model's, and attacks that "
                                 "stop early or pick among samples stay fp32.")


def eval_cmd(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Zoo name or checkpoint file (default: the "
                                                                    "latest run, else the current model)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="With a checkpoint file: zoo name or package.module:Class."),
    arch_kwargs: Optional[str] = typer.Option(None, "--arch-kwargs", help="JSON constructor arguments for a "
                                                                          "package.module:Class --arch, e.g. '{\"width\": 16}'."),
    run: Optional[str] = _RUN,
    suite: Optional[str] = typer.Option(None, "--suite", "-s", help="paper, aa, aa-parts, quick, full, "
                                                                    "wasserstein or corruptions (default paper).",
                                        show_default=False),
    attacks: Optional[str] = typer.Option(None, "--attacks", help="Comma-separated attacks instead of a suite, "
                                                                  f"e.g. fgsm,pgd20,cw; any of {', '.join(attack_names())}."),
    n_examples: Optional[int] = typer.Option(None, "--n-examples", "-n", help="First N test images "
                                                                            "(default 1000, or all if fewer)."),
    eps: Optional[str] = typer.Option(None, "--eps", help="Budget: L∞ ε, or an L2 model's L2 radius (default: the dataset's)."),
    threat_model: str = typer.Option("Linf", "--threat-model", "-t", help="Leaderboard of a --model zoo name: Linf, "
                                                                         "L2 or corruptions."),
    mode: str = typer.Option("independent", "--mode", help="independent (each attack on every example: the "
                                                           "paper's columns) or cascade (only still-robust "
                                                           "examples: fastest A_rob)."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per attack batch, at most --chunk-size "
                                                                   "(lower it when memory runs out).",
                                   show_default=True),
    seed: int = typer.Option(0, "--seed", help="Seed of the attacks' random starts and of the training-image "
                                               "sample for attacks that learn first.", show_default=True),
    device: str = DeviceOpt,
    baseline: bool = typer.Option(False, "--baseline", help="Also evaluate the run's base model on the same "
                                                            "examples: before → after."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset name, or a folder of images with "
                                                                        "one subfolder per class."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the dataset files are."),
    budgets: Optional[str] = typer.Option(None, "--budgets", help="W-PGD budgets for --suite wasserstein, "
                                                                  "e.g. 0.05,0.1 (default ε·(1/4, 1/2, 1, 2))."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Leaderboard entry name (default <model>_<suite>, or "
                                                              "<model>_<attacks>_eps<ε>_n<N> for --attacks, plus "
                                                              "what differs from the defaults, e.g. _n200)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing entry of the same name."),
    settings: Optional[List[str]] = typer.Option(None, "--set", help="Attack setting ATTACK.KEY=VALUE, "
                                                                     "repeatable (e.g. autoattack.version=plus)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted evaluation of the same entry "
                                                        "(of the same --shard, or under torchrun of every rank)."),
    shard: Optional[str] = _SHARD,
    shard_dir: Optional[Path] = _SHARD_DIR,
    chunk_size: int = _CHUNK_SIZE,
    amp: bool = _AMP,
    audit: bool = _AUDIT,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    nproc: Optional[int] = _NPROC,
    workspace: Path = WorkspaceOpt,
) -> None:
    """Evaluate a model (default: the latest run) with an attack suite; write a leaderboard entry.
    Under torchrun the ranks share the examples and rank 0 writes the entry."""
    from ..distributed import is_main_process

    if nproc is not None:  # checks the device here, then starts torchrun with this command
        return _launch(nproc, device, ctx)
    from ..evaluation import EvalRequest, evaluate_workspace
    from ..utils import parse_json_object
    from .report import reporter

    main_rank = is_main_process()  # read before any work: rank 0 alone prints
    _check_flags(suite, attacks, audit)
    request = EvalRequest(model=model, arch=arch, arch_kwargs=parse_json_object(arch_kwargs), run=run, suite=suite,
                          attacks=attacks, n_examples=n_examples, eps=eps, mode=mode, batch_size=batch_size,
                          seed=seed, device=device, baseline=baseline, dataset=dataset, data_dir=data_dir,
                          budgets=budgets, entry=entry, resume=resume, workspace=workspace,
                          attack_settings=parse_settings(settings), amp=amp, overwrite=overwrite, shard=shard,
                          shard_dir=shard_dir, chunk_size=chunk_size, threat_model=threat_model)
    try:
        rec = evaluate_workspace(request, reporter=reporter(progress and main_rank))
    except KeyboardInterrupt:
        # Flags are saved after every batch: the same command with --resume continues from there.
        if main_rank:
            err_console.print("interrupted: finished batches are saved; run the same command with --resume to "
                              "continue", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(130) from None
    _report(rec, request, audit, progress, workspace)


def _check_flags(suite: str | None, attacks: str | None, audit: bool) -> None:
    if suite is not None and attacks is not None:
        raise UserError(f"give --suite {suite} or --attacks {attacks}, not both: a suite is a list of attacks")
    if audit and str(suite).lower() == "corruptions":
        raise UserError("--audit checks attacks for gradient masking, and --suite corruptions runs none: drop --audit")


def _report(rec, request, audit: bool, progress: bool, workspace: Path) -> None:
    """Print what `eval` did; then the audit (--audit), or a hint to run one after paper or aa."""
    from ..evaluation import CorruptionRecord, ShardRecord

    if isinstance(rec, ShardRecord):
        return _print_shard(rec, workspace)
    if isinstance(rec, CorruptionRecord):
        return print_corruption_record(rec)
    if rec is None:  # a torchrun rank other than 0 (rank 0 reports)
        return None
    print_record(rec)
    if audit:
        _audit(rec, request, progress)
    elif rec.suite in ("paper", "aa"):
        console.print(f"no audit ran: add --audit, or run 'adt-ft audit --entry {rec.json_path.stem}' with the same "
                      "model, to check this number for gradient masking", highlight=False, soft_wrap=True,
                      markup=False)


def _audit(rec, request, progress: bool) -> None:
    """`eval --audit`: the audit of the evaluated model on the entry's first images, recorded in the entry."""
    from ..evaluation.audit import DEFAULT_AUDIT_EXAMPLES
    from ..evaluation.audit_run import audit_workspace
    from .audit_cmd import print_audit
    from .report import reporter

    r = request
    audited = audit_workspace(model=r.model, arch=r.arch, arch_kwargs=r.arch_kwargs, run=r.run, dataset=r.dataset,
                              data_dir=r.data_dir, device=r.device, batch_size=r.batch_size, seed=r.seed,
                              workspace=r.workspace, entry=str(rec.json_path), eps=rec.result.eps,
                              n_examples=min(DEFAULT_AUDIT_EXAMPLES, rec.result.n_examples),
                              reporter=reporter(progress), default_model=True)
    print_audit(audited.report, audited.label)
    console.print(f"audit recorded in {rec.json_path}", highlight=False, soft_wrap=True, markup=False)


def _command_line_args(ctx) -> list[str]:
    """This command's options as given on the command line (not defaults), for the ranks torchrun starts."""
    args: list[str] = []
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name)
        if p.name == "nproc" or source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[p.name]
        if getattr(p, "is_flag", False):
            args.append(p.opts[0] if value else p.secondary_opts[0])
            continue
        for v in (value if getattr(p, "multiple", False) else [value]):
            args += [p.opts[0], str(v)]  # the first spelling: --from-run, which torchrun leaves alone
    return args


def _launch(nproc: int, device: str, ctx: typer.Context) -> None:
    """`adt-ft eval --nproc N`: check what every rank would refuse alike (the device) here, as one line,
    then run the same command under `torchrun --standalone --nproc-per-node N`."""
    import os
    import subprocess
    import sys

    from ..utils import resolve_device

    if os.environ.get("WORLD_SIZE"):
        raise UserError("--nproc starts torchrun itself: drop it when the command already runs under torchrun")
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    dev = resolve_device(device)
    if dev.type == "cuda":
        import torch

        if nproc > torch.cuda.device_count():
            raise UserError(f"--nproc {nproc} but only {torch.cuda.device_count()} GPU(s) on this machine: give at "
                            "most one process per GPU")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "adt_finetune", "eval", *_command_line_args(ctx)]
    code = subprocess.call(command)
    if code:
        raise typer.Exit(code)


def _print_shard(rec, workspace: Path) -> None:
    part = rec.part
    k, n = part.shard
    console.print(f"shard {k}/{n}: {len(part.positions)} of {part.n_total} examples ({rec.target.label}, suite "
                  f"{rec.suite}, chunks of {part.chunk_size})\nwrote {rec.path}", highlight=False, soft_wrap=True,
                  markup=False)
    console.print(f"when all {n} shards are done: adt-ft merge {rec.path.parent} -w {workspace}", highlight=False,
                  soft_wrap=True, markup=False)


def merge_cmd(
    shards: List[Path] = typer.Argument(..., help="Shard files, or the folder holding them (--shard-dir)."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Leaderboard entry name (default: the shards' own)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing entry of the same name."),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Merge the shard files of 'adt-ft eval --shard K/N' jobs into one leaderboard entry."""
    from ..evaluation import merge_shards

    print_record(merge_shards(shards, workspace=workspace, entry=entry, overwrite=overwrite))


def print_record(rec) -> None:
    from .eval_tables import print_sanity, print_wide, results_table, wasserstein_table

    r = rec.result
    split = f", {r.shards} shards" if r.shards > 1 else ""
    console.print(f"{rec.target.dataset} {rec.target.threat_model} ε = {r.to_json()['eps_str']}, suite {rec.suite}, "
                  f"{r.mode} mode, {rec.data_source}{split}", highlight=False, soft_wrap=True, markup=False)
    if rec.baseline is not None:
        rows = [(f"before: {rec.target.base.label}", rec.baseline), (f"after: {rec.target.label}", r)]
    else:
        rows = [(rec.target.label, r)]
    print_wide(console, results_table(rows))
    if r.wasserstein:
        print_wide(console, wasserstein_table(r.wasserstein))
    for label, res in rows:
        console.print(f"sanity checks ({label}):", highlight=False)
        print_sanity(res, console)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in r.timings_s.items())
    console.print(f"attack time{' (all shards)' if r.shards > 1 else ''}: {times or 'none'}", highlight=False,
                  soft_wrap=True)
    console.print(f"wrote {rec.json_path}\n  and {rec.csv_path}", highlight=False, soft_wrap=True, markup=False)
    if any(res.unreliable for _, res in rows):
        err_console.print("[bold yellow]warning:[/] a sanity check failed; the entry is marked unreliable",
                          highlight=False)


def print_corruption_record(rec) -> None:
    from .eval_tables import corruptions_table, print_sanity, print_wide

    r = rec.result
    console.print(f"{rec.target.dataset} corruptions ({rec.target.label}, a {rec.target.threat_model} model), "
                  f"{rec.data_source}", highlight=False, soft_wrap=True, markup=False)
    print_wide(console, corruptions_table(r))
    clean = "n/a" if r.clean_acc is None else f"{r.clean_acc:.2f}%"
    console.print(f"mean corruption accuracy {r.corruptions_acc:.2f}% (RobustBench's corruptions_acc); clean "
                  f"{clean}: {r.clean_note}", highlight=False, soft_wrap=True, markup=False)
    console.print("sanity checks:", highlight=False)
    print_sanity(r, console)
    console.print(f"wrote {rec.json_path}\n  and {rec.csv_path}", highlight=False, soft_wrap=True, markup=False)
    if r.unreliable:
        err_console.print("[bold yellow]warning:[/] a sanity check failed; the entry is marked unreliable",
                          highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command("merge")(merge_cmd)
