#!/usr/bin/env python
"""The Fashion-MNIST study is a study file run by `adt-ft study` (docs/study.md):

    adt-ft study run recipes/studies/fmnist-paper.yaml -w study-ws
    adt-ft study report recipes/studies/fmnist-paper.yaml

This script only forwards its arguments to the first command, from the repository root.
"""
import os
import sys
from pathlib import Path

os.chdir(Path(__file__).resolve().parent.parent)
from adt_finetune.cli import main  # noqa: E402

main(["study", "run", "recipes/studies/fmnist-paper.yaml", *(sys.argv[1:] or ["-w", "study-ws"])])
