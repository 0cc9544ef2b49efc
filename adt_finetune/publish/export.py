"""`adt-ft export ENTRY --robustbench DIR`: what a pull request to RobustBench needs.

    DIR/model_info/<dataset>/<threat_model>/<Name>.json   RobustBench's fields, filled from the entry
    DIR/models/<dataset>/<threat_model>/<Name>.pt         the fine-tuned state dict, keys of the zoo architecture
    DIR/<Name>.model_zoo.txt                              the model-zoo line to add, and the steps

RobustBench's `load_model(Name, model_dir=DIR/models, ...)` builds the zoo
architecture and reads `<model_dir>/<dataset>/<threat_model>/<Name>.pt` (a plain
state dict); the JSON has exactly the keys its own model_info files have.

Refused, as RobustBench would refuse them: a dataset or threat model it has no
leaderboard for, an architecture its zoo cannot build (adt-ft's `package.module:Class`
models, ensembles, timm-hub models), ε other than the leaderboard's, and a result
that is not AutoAttack (standard) on the full test set (`allow_partial` writes a
draft, marked in the footnote).
"""
from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..leaderboard.entries import Entry, read_entries, read_entry
from ..run_folder import load_run
from ..utils import atomic_torch_save, atomic_write_json, atomic_write_text, format_eps, format_pct, sha256_file
from ..workspace import ModelRef, Workspace
from ..zoo import catalog, resolve_name

#: RobustBench's leaderboards adt-ft can submit to: (ε, size of the test set it evaluates on).
LEADERBOARDS = {("cifar10", "Linf"): (8 / 255, 10_000), ("cifar100", "Linf"): (8 / 255, 10_000),
                ("imagenet", "Linf"): (4 / 255, 5_000), ("cifar10", "L2"): (0.5, 10_000)}
#: Keys every RobustBench model_info file has, then the optional ones, in RobustBench's order.
REQUIRED_KEYS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                 "architecture", "eps", "clean_acc", "reported", "autoattack_acc")
OPTIONAL_KEYS = ("external", "footnote", "unreliable")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_ZOO_MODULE = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet": "imagenet"}
_FILE_SOURCE = re.compile(r"^file (?P<path>.+) \((?P<arch>[^()]+)\)$")
DRAFT = "DRAFT, not for submission"


@dataclass
class Export:
    name: str
    json_path: Path
    checkpoint_path: Path
    registration_path: Path
    architecture: str        # the zoo entry whose architecture the checkpoint loads into
    draft: bool              # written with allow_partial for a result RobustBench would not list
    draft_reason: str | None


def find_entry(entry: str | os.PathLike, workspace: str | os.PathLike = ".") -> Entry:
    """An entry by JSON path, or by name among the workspace's leaderboard entries."""
    path = Path(entry).expanduser()
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise UserError(f"leaderboard entry {path} does not exist: give an entry name or its JSON file")
        return read_entry(path)
    ws = Workspace(workspace)
    found = [e for e in read_entries(ws.leaderboard_dir) if e.entry == str(entry)]
    if not found:
        raise UserError(f"no leaderboard entry {str(entry)!r} in {ws.leaderboard_dir}: give an entry name "
                        "('adt-ft leaderboard' lists them) or the path of its JSON file")
    if len(found) > 1:
        raise UserError(f"{len(found)} entries are named {str(entry)!r} ({', '.join(str(e.path) for e in found)}): "
                        "give the path of the JSON file")
    return found[0]


def _weights(e: Entry, ws: Workspace) -> ModelRef:
    """How to rebuild the evaluated model: its run's final weights, or the checkpoint file it was given."""
    x = e.extra
    if x.get("run_id"):
        try:
            model = load_run(x["run_id"], ws.root).model
        except UserError as why:
            raise UserError(f"entry {e.entry} was evaluated from run {x['run_id']}, which workspace {ws.root} "
                            f"cannot give ({why}): pass -w with the workspace that holds "
                            f"runs/{x['run_id']}") from None
        if model is None:  # load_run refuses unfinished runs; this guards a hand-edited run.json
            raise UserError(f"run {x['run_id']} of entry {e.entry} has no final model")
        return model
    source = str(x.get("model_source") or "")
    m = _FILE_SOURCE.match(source)
    if m:
        return ModelRef(name=Path(m["path"]).stem, arch=m["arch"], dataset=e.dataset, threat_model=e.threat_model,
                        path=m["path"], source="file")
    if source == "zoo":
        raise UserError(f"entry {e.entry} evaluates RobustBench's own model {x.get('base_model')}: it is in the "
                        "zoo already; export the entry of a fine-tuning run ('adt-ft eval `run` RUN')")
    raise UserError(f"entry {e.entry} records no weights adt-ft can find (model source {source or 'unknown'!r}): "
                    "export the entry of a fine-tuning run ('adt-ft eval `run` RUN') or of a checkpoint file "
                    "evaluated with `model` FILE `arch` ZOO_NAME")


def _zoo_architecture(ref: ModelRef, dataset: str, threat_model: str):
    """The zoo entry whose architecture RobustBench builds for this model, or a refusal."""
    if ":" in ref.arch:
        raise UserError(f"architecture {ref.arch} is not one RobustBench can build: its loader only builds the "
                        "architectures of its model zoo; fine-tune a zoo model, or evaluate a checkpoint with "
                        "`arch` <zoo name> when its weights fit a zoo architecture")
    zoo = resolve_name(ref.arch, dataset, threat_model)
    if zoo.checkpoint != "gdrive":
        how = {"ensemble": "an ensemble read from several files", "timm": "a timm model served from the "
               "Hugging Face Hub", "torchvision": "torchvision's own pretrained model"}.get(zoo.checkpoint or "",
                                                                                            "not loadable")
        raise UserError(f"architecture {zoo.name} is {how}: RobustBench's loader cannot read one fine-tuned "
                        "checkpoint file for it")
    return zoo


def partial_reason(e: Entry) -> str | None:
    """Why the entry is not AutoAttack (standard) on the full test set; None when it is."""
    x = e.extra
    _, full_n = LEADERBOARDS[(e.dataset, e.threat_model)]
    if e.autoattack is None:
        return "it has no AutoAttack accuracy (AutoAttack was not in its suite, or ran after other attacks)"
    settings = (x.get("attack_settings") or {}).get("autoattack") or {}
    if (settings.get("version") or "standard") != "standard":
        return f"AutoAttack ran as version {settings['version']!r}, not 'standard'"
    if settings.get("attacks"):
        return f"AutoAttack ran only {settings['attacks']}, not its standard set"
    data = str(x.get("data") or "")
    if e.n != full_n or f"of the {e.dataset} test set" not in data:
        return (f"it was evaluated on the {data or f'{e.n} examples'}, not the full {e.dataset} test set "
                f"({full_n} images)")
    return None


def check_exportable(e: Entry, allow_partial: bool = False) -> str | None:
    """Refuse (UserError) what RobustBench would reject; the draft reason when allow_partial lets it pass."""
    key = (e.dataset, e.threat_model)
    if e.is_corruptions:
        raise UserError(f"entry {e.entry} is a corruptions entry: RobustBench's corruptions leaderboard also lists "
                        "the mCE against its AlexNet results, which adt-ft does not compute, so it is not exported; "
                        "submit corruptions results with RobustBench's own benchmark()")
    if key not in LEADERBOARDS:
        boards = ", ".join(f"{d} {t}" for d, t in LEADERBOARDS)
        raise UserError(f"RobustBench has no {e.dataset} {e.threat_model} leaderboard that adt-ft can submit to "
                        f"(entry {e.entry}): only {boards}")
    eps, _ = LEADERBOARDS[key]
    if e.eps is None or abs(e.eps - eps) > 1e-6:
        raise UserError(f"entry {e.entry} was evaluated at ε = {e.eps_label or 'unknown'}; RobustBench's "
                        f"{e.dataset} {e.threat_model} leaderboard is at ε = {format_eps(eps)}: evaluate again "
                        f"with `eps` {format_eps(eps)}")
    reason = partial_reason(e)
    if reason and not allow_partial:
        raise UserError(f"entry {e.entry} is not AutoAttack (standard) on the full test set: {reason}; evaluate "
                        "with 'adt-ft eval `suite` aa' on the whole test set, or pass `allow_partial` for a draft")
    return reason


def default_name(e: Entry) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]", "_", e.entry)
    return name if name[:1].isalpha() else f"adtft_{name}"


def _check_name(name: str, dataset: str, threat_model: str) -> str:
    if not _NAME.match(name):
        raise UserError(f"`name` {name!r}: a RobustBench model name is letters, digits, '_' and '-', starting "
                        "with a letter (e.g. Smith2025Distributional_WRN-28-10)")
    taken = {z.name.lower() for z in catalog(dataset, threat_model)}
    if name.lower() in taken:
        raise UserError(f"`name` {name}: RobustBench's {dataset} {threat_model} zoo already has a model of that "
                        "name: choose another")
    return name


def _footnote(e: Entry, reason: str | None, external: bool) -> str:
    x = e.extra
    how = ", ".join(f"{k} {x[k]}" for k in ("loss", "scope") if x.get(k))
    epochs = f", {x['epochs']} epoch{'' if x['epochs'] == 1 else 's'}" if x.get("epochs") else ""
    parts = [f"{str(x['method']).upper()} fine-tune of {x.get('base_model')} ({how}{epochs}) with adt-ft."
             if x.get("method") else f"Weights of {x.get('base_model') or e.entry}, evaluated with adt-ft."]
    if external:
        attacks = ", ".join(a for a in e.attacks)
        parts.append(f"external: per-example minimum over {attacks}.")
    if reason:
        parts.insert(0, f"{DRAFT}: {reason}; autoattack_acc holds adt-ft's robust accuracy on those examples.")
    return " ".join(parts)


def _percent(v) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def model_info(e: Entry, zoo, *, title: str | None = None, authors: str | None = None, venue: str | None = None,
               link: str | None = None, draft_reason: str | None = None) -> dict:
    """RobustBench's model_info JSON for the entry, with exactly the keys its own files have."""
    d = e.data
    aa = e.autoattack if e.autoattack is not None else e.robust
    if aa is None:
        raise UserError(f"entry {e.entry} has no robust accuracy to report")
    external = _percent(d.get("external"))
    use_external = external is not None and external < aa - 1e-9
    info = {
        "link": link if link is not None else str(d.get("link") or ""),
        "name": title if title is not None else str(d.get("name") or e.entry),
        "authors": authors if authors is not None else str(d.get("authors") or ""),
        "additional_data": bool(d.get("additional_data", False)),
        "number_forward_passes": int(d.get("number_forward_passes") or 1),
        "dataset": e.dataset,
        "venue": venue if venue is not None else str(d.get("venue") or "Unpublished"),
        # The zoo's own name for the architecture the checkpoint loads into ("ResNet-18"), not adt-ft's spec.
        "architecture": zoo.architecture,
        "eps": format_eps(LEADERBOARDS[(e.dataset, e.threat_model)][0]),
        "clean_acc": format_pct(e.clean),
        "reported": format_pct(e.a_rob if e.a_rob is not None else e.robust),
        "autoattack_acc": format_pct(aa),
    }
    if use_external:
        info["external"] = format_pct(external)
    info["footnote"] = _footnote(e, draft_reason, use_external)
    info["unreliable"] = bool(d.get("unreliable", False))
    return info


def _constructor(zoo) -> str | None:
    """The zoo table's constructor expression for the architecture, as RobustBench's own file writes it."""
    from ..zoo import robustbench_compat as rb

    fn = rb.zoo_record(zoo.name, zoo.dataset, zoo.threat_model)["model"]
    name = getattr(fn, "__name__", "")
    if name and name != "<lambda>":
        return name
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    m = re.search(r"(lambda\s*:.*)", source.strip())
    expr = m.group(1).rstrip().rstrip(",") if m else None
    try:
        compile(expr or "", "<constructor>", "eval")
    except SyntaxError:  # a constructor spread over several lines: refer to the base entry instead
        return None
    return expr


def registration_text(name: str, zoo, checkpoint: Path, sha: str) -> str:
    module = f"robustbench/model_zoo/{_ZOO_MODULE[zoo.dataset]}.py"
    dict_name = zoo.threat_model.lower()
    expr = _constructor(zoo)
    if expr is not None:
        line = (f"    ('{name}', {{\n        'model': {expr},  # the architecture of {zoo.name}\n"
                f"        'gdrive_id': 'GOOGLE_DRIVE_FILE_ID',\n    }}),\n")
        where = f"Add this item to the `{dict_name}` OrderedDict in {module}:"
    else:
        line = (f"{dict_name}['{name}'] = {{'model': {dict_name}['{zoo.name}']['model'], "
                f"'gdrive_id': 'GOOGLE_DRIVE_FILE_ID'}}\n")
        where = f"Add this line after the `{dict_name}` OrderedDict in {module}:"
    return (f"RobustBench model-zoo registration for {name} ({zoo.dataset}, {zoo.threat_model}), written by "
            f"adt-ft export.\n\n"
            f"1. Upload models/{zoo.dataset}/{zoo.threat_model}/{checkpoint.name} (sha256 {sha}) to Google Drive\n"
            f"   and put its file id in place of GOOGLE_DRIVE_FILE_ID below.\n"
            f"2. {where}\n\n{line}\n"
            f"3. Copy model_info/{zoo.dataset}/{zoo.threat_model}/{name}.json into RobustBench's\n"
            f"   model_info/{zoo.dataset}/{zoo.threat_model}/.\n")


def export_robustbench(entry: str | os.PathLike, out_dir: str | os.PathLike, *, workspace: str | os.PathLike = ".",
                       name: str | None = None, title: str | None = None, authors: str | None = None,
                       venue: str | None = None, link: str | None = None, allow_partial: bool = False) -> Export:
    """Write the model_info JSON, the checkpoint and the zoo registration text (see the module docstring)."""
    from ..zoo import build_architecture, load_weights, read_state_dict

    ws = Workspace(workspace)
    e = find_entry(entry, ws.root)
    check_exportable(e, allow_partial=True)  # dataset, threat model and ε first: no run needed for them
    ref = _weights(e, ws)
    zoo = _zoo_architecture(ref, e.dataset, e.threat_model)
    reason = check_exportable(e, allow_partial)
    name = _check_name(name or default_name(e), e.dataset, e.threat_model)
    info = model_info(e, zoo, title=title, authors=authors, venue=venue, link=link, draft_reason=reason)

    model = build_architecture(zoo.name, e.dataset, e.threat_model)
    load_weights(model, read_state_dict(ref.path), ref.path)
    out = Path(out_dir).expanduser()
    ckpt = out / "models" / e.dataset / e.threat_model / f"{name}.pt"
    atomic_torch_save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, ckpt)
    json_path = out / "model_info" / e.dataset / e.threat_model / f"{name}.json"
    atomic_write_json(json_path, info)
    reg = out / f"{name}.model_zoo.txt"
    atomic_write_text(reg, registration_text(name, zoo, ckpt, sha256_file(ckpt)))
    return Export(name, json_path, ckpt, reg, zoo.name, reason is not None, reason)
