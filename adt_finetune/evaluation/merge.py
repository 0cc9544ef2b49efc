"""`adt-ft merge` as a function: the shard files of one evaluation into its leaderboard entry.

The merge refuses, in one line naming the file, a missing or duplicated shard and
shards of different evaluations (their fingerprints differ: another model,
other images or settings); see `shards.check_shards`.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..leaderboard import check_entry_name
from ..workspace import Workspace, check_plain_name
from .workspace_eval import EvalRecord, _resume_dir, claim_entry, write_record
from .shard_files import ShardFile, find_shard_files, read_shard_file
from .shards import combine
from .targets import Target


def merge_shards(paths: Sequence[str | Path], *, workspace: str | Path = ".", entry: str | None = None,
                 overwrite: bool = False) -> EvalRecord:
    """Combine the shard files found in `paths` (files, or folders holding them) into one
    leaderboard entry of `workspace` (named as the shards say, or `entry`), as one process
    evaluating every example would have written it. Partial flags that the shard jobs left
    in this workspace are removed once the entry is written."""
    ws = Workspace(workspace)
    files = [read_shard_file(p) for p in find_shard_files(paths)]
    names = [f.path.name for f in files]
    entries = sorted({f.entry for f in files})
    if len(entries) > 1 and entry is None:
        raise UserError(f"the shard files are of {len(entries)} entries ({', '.join(entries)}): merge one entry's "
                        "shards at a time")
    main = combine([f.main for f in files], names)
    base = _combine_baselines(files, names)
    first = files[0]
    name = entry or first.entry
    check_entry_name(name)
    target = _target(first)
    lock = claim_entry(ws, target.dataset, target.threat_model, name, overwrite)
    try:
        record = write_record(ws, target, name, first.meta["context"], first.meta["suite"],
                              first.meta["data_source"], main, base)
    finally:
        lock.release()
    partial = _resume_dir(ws.root, target.dataset, target.threat_model, first.entry).parent
    own = re.compile(rf"^{re.escape(first.entry)}(\.baseline)?\.shard-\d+-of-\d+$")
    if partial.is_dir():
        for d in partial.iterdir():
            if own.match(d.name) and d.is_dir():
                shutil.rmtree(d)
    return record


def _combine_baselines(files: list[ShardFile], names: list[str]):
    with_base = [f.baseline is not None for f in files]
    if any(with_base) and not all(with_base):
        odd = names[with_base.index(not with_base[0])]
        raise UserError(f"{odd} and {names[0]} are shards of different evaluations (one has `baseline`, the other "
                        "not): merge the shards of one evaluation")
    return combine([f.baseline for f in files], names) if with_base[0] else None


def _target(shard: ShardFile) -> Target:
    """The model as the shard describes it (no weights: a merge does not need them); its dataset and
    threat model become folder names, so they must be plain names."""
    m = shard.meta
    for block, where in ((m, "meta"), (m.get("base") or {}, "meta.base")):
        for key in ("dataset", "threat_model") if block else ():
            check_plain_name(block.get(key), f"shard file {shard.path}: {where}.{key}")
    base = None
    if m.get("base"):
        b = m["base"]
        base = Target(b["label"], None, b["dataset"], b["threat_model"], dict(b["info"]), {}, b["label"])
    return Target(m["label"], None, m["dataset"], m["threat_model"], dict(m["info"]), dict(m["context"]),
                  shard.entry, base=base)
