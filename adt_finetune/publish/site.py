"""`adt-ft leaderboard --html DIR`: the leaderboard as a static site.

    DIR/index.html                              the boards: one per dataset and threat model
    DIR/<dataset>/<threat_model>/index.html     sortable, filterable tables, seed groups, scatter
    DIR/<dataset>/<threat_model>/<entry>.html   one page per entry
    DIR/<dataset>/<threat_model>/<entry>.json   the entry as written, and its per-example CSV(s)
    DIR/assets/site.css, site.js                the only assets; nothing is fetched from the network

The pages open from disk (file://) as well as from any static host. The site is
written into a temporary folder beside DIR and renamed into place, so DIR never
holds half a site; a DIR that exists must be a site written here before (it has
the marker file), so a mistyped path never replaces someone's folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
from ..leaderboard.entries import Entry, check_per_example, verify_entries
from ..leaderboard.render import comparable_groups
from ..leaderboard.seeds import group_by_seed
from ..utils import atomic_write_text, format_pct
from .board import board_scatter, board_tables, slug
from .entry_page import entry_view

MARKER = ".adt-ft-site"
_HERE = Path(__file__).parent


@dataclass
class Site:
    root: Path                      # DIR
    index: Path                     # DIR/index.html
    boards: list[Path] = field(default_factory=list)
    pages: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(_HERE / "templates")),
                              autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True, keep_trailing_newline=True)


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"`html` {out} is a file: give a folder for the site")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UserError(f"`html` {out} is a folder with other files in it (no {MARKER} from an earlier site): "
                        "give a new or empty folder, the whole folder is replaced on every write")


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def _reached_through_link(e: Entry, src: Path) -> bool:
    """Whether `src`, a file of entry `e`, is a link, or lies in a folder reached through one, or outside
    the entry's folder: such a file may be anything on this machine (/etc/passwd), never published."""
    chain = [src, e.path, e.path.parent, e.path.parent.parent]
    return any(p.is_symlink() for p in chain) or src.resolve().parent != e.path.resolve().parent


def _entry_files(e: Entry, folder: Path, page: str, site: Site) -> list[dict[str, Any]]:
    """Copy the entry's JSON and per-example CSV(s) into the board folder; link list for its page.
    A file reached through a link is not copied (the page and the warnings say so)."""
    if _reached_through_link(e, e.path):
        site.warnings.append(f"entry {e.entry} ({e.path}) is reached through a link: its files are not published")
        return [{"href": "", "label": f"{e.entry}.json", "note": "not published: reached through a link"}]
    files = [{"href": f"{page}.json", "label": f"{e.entry}.json (the entry as written)", "note": ""}]
    _copy(e.path, folder / f"{page}.json")
    for baseline in (False, True):
        block = e.extra.get("baseline") if baseline else e.extra
        name = (block or {}).get("per_example_file") if isinstance(block, dict) else None
        if not name:
            continue
        check = check_per_example(e, baseline=baseline)
        src = check.path or e.path.with_name(name)
        what = "base model's per-example results" if baseline else "per-example results"
        if not src.is_file():
            files.append({"href": "", "label": f"{name} ({what})", "note": f"missing: {check.problem}"})
            continue
        if _reached_through_link(e, src):
            site.warnings.append(f"entry {e.entry}: {src} is a link or lies outside the entry's folder: not published")
            files.append({"href": "", "label": f"{name} ({what})", "note": "not published: reached through a link"})
            continue
        _copy(src, folder / slug(name))
        note = f"sha256 {block.get('per_example_sha256')}" if check.problem is None else f"⚠ {check.problem}"
        files.append({"href": slug(name), "label": f"{name} ({what}, CSV)", "note": note})
    return [f for f in files if f["href"] or f["note"]]


def _hrefs(entries: list[Entry]) -> dict[str, str]:
    """entry name → page file name, unique within a board."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for e in entries:
        base = page = slug(e.entry)
        i = 2
        while page.lower() in used or page.lower() == "index":
            page, i = f"{base}-{i}", i + 1
        used.add(page.lower())
        out[e.entry] = page
    return out


def _best(entries: list[Entry], href: str, pages: dict[str, str]) -> list[dict[str, str]]:
    """The top ranked entry (AutoAttack standard) of each comparability group; a group of weaker
    evaluations only is named with no value, since none of its entries is ranked."""
    groups = comparable_groups(entries)
    out = []
    for g in groups:
        where = g.where.split(", ", 1)[1] if ", " in g.where else g.where
        if g.ranked:
            top = g.entries[0]
            out.append({"value": format_pct(top.autoattack), "where": where, "entry": top.entry,
                        "href": f"{href.rsplit('/', 1)[0]}/{pages[top.entry]}.html"})
        elif not any(o.ranked and o.where == g.where for o in groups):
            n = len(g.entries)
            out.append({"value": "—", "where": where, "entry": f"none ranked: {n} weaker evaluation{'s' * (n > 1)} "
                        "(no AutoAttack standard)", "href": ""})
    return out


def _write_board(env, tmp: Path, ds: str, tm: str, entries: list[Entry], groups, site: Site) -> dict[str, Any]:
    folder = tmp / slug(ds) / slug(tm)
    folder.mkdir(parents=True, exist_ok=True)
    pages = _hrefs(entries)
    links = {name: f"{page}.html" for name, page in pages.items()}
    tables, group_tables = board_tables(entries, [g for g in groups if g.first in entries], links)
    board = folder / "index.html"
    atomic_write_text(board, env.get_template("board.html.j2").render(
        root="../../", title=f"{ds} / {tm} — adt-ft leaderboard", dataset=ds, threat_model=tm,
        count=len(entries), tables=tables, group_tables=group_tables, scatter_svg=board_scatter(entries, links),
        warnings=[f"{e.entry}: {e.problem}" for e in entries if e.problem]))
    site.boards.append(board)
    for e in entries:
        view = entry_view(e, _entry_files(e, folder, pages[e.entry], site))
        page = folder / links[e.entry]
        atomic_write_text(page, env.get_template("entry.html.j2").render(
            root="../../", title=f"{e.entry} — {ds} / {tm}", e=view))
        site.pages.append(page)
    href = f"{slug(ds)}/{slug(tm)}/index.html"
    return {"dataset": ds, "threat_model": tm, "count": len(entries), "href": href,
            "best": _best(entries, href, pages)}


def _install(tmp: Path, out: Path) -> None:
    """Put the finished site at `out`: one rename when `out` is new, else old aside, new in, old removed."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "site")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def build_site(entries: Iterable[Entry], out_dir: str | os.PathLike, *,
               workspace: str | os.PathLike | None = None) -> Site:
    """Write the static site for `entries` into `out_dir` (replaced as a whole; see the module docstring).

    `workspace` lets seed groups show training seeds recorded only in the runs' run.json.
    Entries whose per-example file does not match its recorded sha256 are marked, not dropped.
    """
    entries = list(entries)
    if not entries:
        raise UserError("no leaderboard entries to publish: write one with 'adt-ft eval'")
    out = Path(out_dir).expanduser().resolve()
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    site = Site(out, out / "index.html", warnings=verify_entries(entries))
    groups = group_by_seed(entries, workspace)
    env = _environment()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; a site is meant to be served
        (tmp / "assets").mkdir()
        for name in ("site.css", "site.js"):
            _copy(_HERE / "static" / name, tmp / "assets" / name)
        boards: dict[tuple[str, str], list[Entry]] = {}
        for e in entries:
            boards.setdefault((e.dataset, e.threat_model), []).append(e)
        listed = [_write_board(env, tmp, ds, tm, members, groups, site)
                  for (ds, tm), members in sorted(boards.items())]
        atomic_write_text(tmp / "index.html", env.get_template("index.html.j2").render(
            root="", title="adt-ft leaderboard", boards=listed, n_entries=len(entries)))
        atomic_write_text(tmp / MARKER, "written by 'adt-ft leaderboard --html'; the whole folder is replaced "
                                        "on every write\n")
        _install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    site.boards = [out / p.relative_to(tmp) for p in site.boards]
    site.pages = [out / p.relative_to(tmp) for p in site.pages]
    return site
