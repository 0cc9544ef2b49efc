"""The code's shape, as rules that can fail (issue 11): the layer contracts of pyproject.toml hold
(`lint-imports`), no library module is over 500 lines and no function over 80."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "adt_finetune"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under `root` with the project's own contracts."""
    exe = Path(sys.executable).with_name("lint-imports")
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([str(exe), "--no-cache", str(REPO / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    out = _lint_imports(REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "BROKEN" not in out.stdout and "KEPT" in out.stdout


def test_import_contracts_fail_when_the_library_imports_its_cli(tmp_path):
    """The contracts can fail: one upward import added to a copy of the package breaks them."""
    copy = tmp_path / "adt_finetune"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "perturb" / "linf.py"
    target.write_text(target.read_text() + "\nfrom adt_finetune.cli.common import console  # noqa\n")
    out = _lint_imports(tmp_path)
    assert out.returncode != 0
    assert "adt_finetune.perturb.linf -> adt_finetune.cli.common" in out.stdout.replace("\n", " ").replace("  ", " ") \
        or "adt_finetune.cli" in out.stdout


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def long_modules(paths: list[Path]) -> dict[str, int]:
    return {p.name if not p.is_relative_to(REPO) else str(p.relative_to(REPO)): n for p in paths
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}


def long_functions(paths: list[Path]) -> dict[str, int]:
    long = {}
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.name}:{node.lineno} {node.name}"] = n
    return long


def test_no_module_is_over_500_lines():
    assert long_modules(_modules()) == {}, "split these modules by job"


def test_no_script_is_over_500_lines():
    scripts = sorted((Path(__file__).resolve().parent.parent / "scripts").glob("*.py"))
    assert scripts and long_modules(scripts) == {}, "move the logic into the library (scripts stay thin)"


def test_no_function_is_over_80_lines():
    assert long_functions(_modules()) == {}, "split these functions"


def test_the_shape_checks_can_fail(tmp_path):
    """The two counters see what they should: an 81-line function in a 501-line module."""
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    bad = tmp_path / "bad.py"
    bad.write_text(f"def f():\n{body}\n" + "\n" * (MAX_MODULE_LINES - 80))
    assert long_functions([bad]) == {"bad.py:1 f": 81}
    assert long_modules([bad]) == {"bad.py": 501}


def shared_base_names(paths: list[Path]) -> dict[str, list[str]]:
    """Module base names used by more than one module (package `__init__` and `base` aside)."""
    by_name: dict[str, list[str]] = {}
    for p in paths:
        if p.stem not in ("__init__", "base"):
            by_name.setdefault(p.stem, []).append(str(p.relative_to(p.parents[1])) if len(p.parents) > 1 else p.name)
    return {name: where for name, where in by_name.items() if len(where) > 1}


def test_no_two_modules_share_a_base_name():
    """`settings.py` in two packages makes every traceback, import and search ambiguous."""
    assert shared_base_names(_modules()) == {}, "rename one of each pair to say what it holds"


def test_the_base_name_check_can_fail(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for stem in ("settings", "__init__", "base", folder):
            (tmp_path / folder / f"{stem}.py").write_text("")
    found = shared_base_names(sorted(tmp_path.rglob("*.py")))
    assert found == {"settings": ["a/settings.py", "b/settings.py"]}


# The modules a setting passes through from `adt-ft eval` / `adt-ft train` to its use.
HANDOFF_PATHS = ["cli/eval_cmd.py", "cli/train_cmd.py", "evaluation/workspace_eval.py", "evaluation/eval_request.py",
                 "evaluation/corruption_run.py",
                 "evaluation/engine.py", "training/*.py"]
# torch's own forward(*inputs, **kwargs) interface, passed on to the wrapped module unchanged; the train
# command's signature, generated with one keyword per TrainConfig field, whose values become a TrainConfig.
HANDOFF_ALLOWED = {"parallel.py:forward", "train_cmd.py:train_command"}


def handoffs(paths: list[Path]) -> list[str]:
    """Untyped hand-offs of settings: `locals()`, functions that take `**options`, and calls that pass
    on such options or a dict packed with `dict(...)` (`f(**options)`, `f(**kwargs)`, `f(**job.common)`)."""
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            if f"{path.name}:{fn.name}" in HANDOFF_ALLOWED:
                continue
            where = f"{path.name}:{fn.lineno}"
            packed = set()
            if fn.args.kwarg is not None:
                found.append(f"{where} def {fn.name}(**{fn.args.kwarg.arg})")
                packed.add(fn.args.kwarg.arg)
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                        and isinstance(node.value.func, ast.Name) and node.value.func.id in ("dict", "locals"):
                    packed |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "locals":
                    found.append(f"{path.name}:{node.lineno} locals()")
                if isinstance(node, ast.Call):
                    found += [f"{path.name}:{node.lineno} **{ast.unparse(k.value)}" for k in node.keywords
                              if k.arg is None and (isinstance(k.value, ast.Attribute)
                                                    or isinstance(k.value, ast.Name) and k.value.id in packed)]
    return sorted(set(found))


def test_settings_travel_typed_through_eval_and_train():
    paths = sorted({p for pattern in HANDOFF_PATHS for p in PACKAGE.glob(pattern)})
    assert len(paths) > 8
    assert handoffs(paths) == [], "pass a dataclass (EvalRequest, EvalSettings, TrainConfig), not a dict of options"


def test_the_handoff_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def run(a, b, **options):\n    args = dict(locals())\n    go(**job.common) + go(**args)\n"
                   "    kw = dict(a=a, b=b)\n    go(**kw, **options)\n    extra = {'x': 1}\n    go(**extra)\n")
    assert handoffs([bad]) == ["bad.py:1 def run(**options)", "bad.py:2 locals()", "bad.py:3 **args",
                               "bad.py:3 **job.common", "bad.py:5 **kw", "bad.py:5 **options"]


# Imports of the project's own modules kept inside a function, each for a reason:
LAZY_OWN_IMPORTS = {
    # names are checked against the attack registry when a list is parsed, after every attack registered
    ("evaluation/suites.py", "..attacks"),
    # the catalogue and name resolution answer `adt-ft models` without torch; the loader imports it
    ("zoo/resolve.py", ".loader"),
    # `leaderboard --html` imports publish without torch; only an export builds architectures
    ("publish/export.py", "..zoo"),
}


def local_own_imports(paths: list[Path], root: Path = PACKAGE) -> list[str]:
    """Function-local imports of the project's own modules (`from .x import y` inside a function)."""
    found = []
    for path in paths:
        rel = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
        for fn in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                            "adt_finetune")):
                        module = "." * node.level + (node.module or "")
                        if (rel, module) not in LAZY_OWN_IMPORTS:
                            found.append(f"{rel}:{node.lineno} {fn.name}: from {module}")
    return found


def test_own_modules_are_imported_at_the_top():
    """The layers allow them there; only heavy third-party imports stay lazy (start-up time, see
    tests/test_startup.py). The CLI's commands import the library lazily for the same reason."""
    library = [p for p in _modules() if not {"cli", "study"} & set(p.relative_to(PACKAGE).parts)]
    assert local_own_imports(library) == []


def test_the_local_import_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .top import x\n\ndef f():\n    from ..data import load_dataset\n    import torch\n")
    assert local_own_imports([bad], tmp_path) == ["bad.py:4 f: from ..data"]


FLAG_WORDING = __import__("re").compile(r"(?<![\w`-])--[a-z]")


def flag_wording(paths: list[Path]) -> list[str]:
    """UserError messages of library modules that name a `--flag` (the library names the setting)."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "UserError":
                texts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                found += [f"{path.name}:{node.lineno}" for t in texts if FLAG_WORDING.search(t)]
    return found


def test_library_errors_name_settings_not_flags():
    library = [p for p in _modules() if "cli" not in p.relative_to(PACKAGE).parts]
    assert flag_wording(library) == [], "name the setting in backticks (`gen_width`); the CLI shows its flag"


def test_the_flag_wording_check_can_fail_and_the_cli_maps_settings_to_flags(tmp_path):
    from adt_finetune.cli.common import flags_for_settings

    bad = tmp_path / "bad.py"
    bad.write_text('raise UserError(f"--gen-width must be >= 1, got {w}")\nraise UserError("`gen_width` ok")\n')
    assert flag_wording([bad]) == ["bad.py:1"]
    assert flags_for_settings("`gen_width` must be >= 1; give `attack_settings` or `no_amp`, a `run`") == \
        "--gen-width must be >= 1; give --set or --no-amp, a --run"
