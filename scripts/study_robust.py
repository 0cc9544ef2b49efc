#!/usr/bin/env python
"""The robust-base study is a study file run by `adt-ft study` (docs/study.md):

    adt-ft study run recipes/studies/robust-base.yaml -w study-robust-ws [--workers 2] [--only wdat/trades]
    adt-ft study report recipes/studies/robust-base.yaml

This script only forwards its arguments to the first command, from the repository root.
"""
import os
import sys
from pathlib import Path

os.chdir(Path(__file__).resolve().parent.parent)
from adt_finetune.cli import main  # noqa: E402

main(["study", "run", "recipes/studies/robust-base.yaml", *(sys.argv[1:] or ["-w", "study-robust-ws"])])
