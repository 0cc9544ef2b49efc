"""Leaderboard entries: RobustBench model_info JSON plus everything else under "adt_ft".

One file per entry at `leaderboard/<dataset>/<threat_model>/<entry>.json`, with
RobustBench's fields and types (the layout of RobustBench's `model_info/`
folders, so its own leaderboard code reads the folder):

    link, name, authors, venue, architecture, footnote   strings (footnote may be null)
    additional_data, unreliable                          bools
    number_forward_passes                                int
    dataset, eps                                         strings ("cifar10", "8/255" or "0.1")
    clean_acc, reported, autoattack_acc, external        percentages as strings with two decimals

- `autoattack_acc` is written only when AutoAttack ran on every clean-correct
  example (independent mode, or AutoAttack first in cascade): otherwise there is
  no AutoAttack accuracy to report, and writing another number under that name
  would be wrong.
- `external` (RobustBench's field for a stronger evaluation than AutoAttack)
  holds A_rob when AutoAttack ran together with other attacks: the per-example
  minimum over AutoAttack and more is at most AutoAttack's accuracy.
  RobustBench ranks by `external`, then `autoattack_acc`; an entry with neither
  (no AutoAttack in the suite) is listed by `adt-ft leaderboard` but cannot be
  ranked by RobustBench's own code.
- `reported` is this evaluation's A_rob (the robust accuracy the entry claims);
  `unreliable` is true when a sanity check failed.
- The per-example file sits beside the JSON as `<entry>.per-example.csv`
  (and `<entry>.baseline.per-example.csv` with --baseline), its sha256 in the JSON;
  `write` explains the order that keeps JSON and CSV consistent when a write is killed.

Modules: `write` (one entry to disk), `entries` (reading, type checks, sha256
verification), `render` (rows ranked within equal ε and n; text, Markdown, JSON),
`figure` (the plot), `seeds` (entries that differ only by seed, as mean ± sd),
`compare` (paired statistics between entries on the same images; imports scipy,
so it is not loaded here).
"""
from __future__ import annotations

from .entries import (Entry, PerExampleCheck, check_per_example, find_entry, read_entries, read_entry, validate,
                      verify_entries)
from .figure import plot, plot_format
from .render import (CUMULATIVE_NOTE, FORMATS, HEADERS, RANKING_NOTE, Group, Section, attack_columns,
                     check_format, comparable_groups, render, render_sections, rows, sections, sort_entries)
from .seeds import SeedGroup, group_by_seed, group_rows, group_sections, render_groups
from .write import (CORRUPTIONS, autoattack_accuracy, check_entry_name, entry_dir, set_audit, write_corruption_entry,
                    write_entry)

__all__ = [
    "CUMULATIVE_NOTE", "FORMATS", "HEADERS", "RANKING_NOTE", "Entry", "Group", "PerExampleCheck", "SeedGroup",
    "Section", "attack_columns", "autoattack_accuracy", "check_entry_name", "check_format", "check_per_example",
    "comparable_groups", "entry_dir", "find_entry", "group_by_seed", "group_rows", "group_sections", "plot",
    "plot_format", "read_entries", "read_entry", "render", "render_groups", "render_sections", "rows", "sections",
    "set_audit", "sort_entries", "validate", "verify_entries", "write_entry", "CORRUPTIONS", "write_corruption_entry",
]
