"""Shard files: what one `adt-ft eval --shard K/N` job leaves for `adt-ft merge`.

One JSON file per job, `<entry>.shard-<K>-of-<N>.json`, holding the shard's
per-example flags (`shards.ShardPart`, for the evaluated model and, with
--baseline, its base model) and everything the leaderboard entry says about the
model, so that the merge needs neither the model nor the images.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..leaderboard import check_entry_name
from ..utils import atomic_write_text
from .result import jsonable
from .shards import ShardPart

SHARD_FILE_FORMAT = 1
KIND = "adt-ft evaluation shard"
_NAME = re.compile(r"^(?P<entry>.+)\.shard-(?P<k>\d+)-of-(?P<n>\d+)\.json$")


def shard_file_name(entry: str, shard: tuple[int, int]) -> str:
    return f"{entry}.shard-{shard[0]}-of-{shard[1]}.json"


@dataclass
class ShardFile:
    path: Path
    entry: str
    main: ShardPart
    baseline: ShardPart | None
    meta: dict[str, Any]    # dataset, threat_model, info, context, suite, data_source, labels


def write_shard_file(path: Path, *, entry: str, main: ShardPart, baseline: ShardPart | None,
                     meta: dict[str, Any]) -> None:
    data = {"format": SHARD_FILE_FORMAT, "kind": KIND, "entry": entry, "meta": jsonable(meta),
            "main": main.to_json(), "baseline": baseline.to_json() if baseline is not None else None}
    atomic_write_text(path, json.dumps(data, separators=(",", ":")) + "\n")


def read_shard_file(path: Path) -> ShardFile:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"shard file {path} is unreadable ({e}): run its shard again") from None
    if not isinstance(data, dict) or data.get("kind") != KIND or data.get("format") != SHARD_FILE_FORMAT:
        raise UserError(f"{path} is not a shard file this version of adt-ft wrote: run its shard again")
    try:
        main = ShardPart.from_json(data["main"])
        base = ShardPart.from_json(data["baseline"]) if data.get("baseline") else None
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"shard file {path} is damaged ({type(e).__name__}: {e}): run its shard again") from None
    try:
        check_entry_name(data.get("entry"))  # a file name under the workspace's partial results
    except UserError as e:
        raise UserError(f"shard file {path}: {e}") from None
    return ShardFile(Path(path), str(data["entry"]), main, base, dict(data["meta"]))


def find_shard_files(paths: Sequence[str | Path]) -> list[Path]:
    """Shard files among `paths`: files as given, folders searched (not recursively) for
    `*.shard-K-of-N.json`."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if _NAME.match(f.name) and f.is_file())
        elif p.is_file():
            found.append(p)
        else:
            raise UserError(f"{p} does not exist: give the shard files or the folder 'adt-ft eval `shard`' wrote "
                            "them to (`shard_dir`)")
    if not found:
        raise UserError(f"no shard files (*.shard-K-of-N.json) in {', '.join(map(str, paths)) or 'nothing'}: give "
                        "the folder 'adt-ft eval `shard`' wrote them to")
    return found
