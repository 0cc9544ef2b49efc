"""The one place that imports RobustBench.

RobustBench 1.1.1 on PyPI imports a module `autoattack`, but the distribution it
depends on (`pyautoattack`) installs its code as `pyautoattack`; without an alias
`import robustbench` fails. It also imports `pkg_resources`, whose deprecation
warning (and timm's) would otherwise greet every user. Everything else in adt-ft
goes through the functions here, so the workaround lives in exactly one module.

Importing RobustBench costs several seconds (it pulls in timm), so it happens on
first use, not when this module is imported.
"""
from __future__ import annotations

import functools
import sys
import warnings
from types import ModuleType


def install_autoattack_alias() -> None:
    """Make `import autoattack` / `import autoattack.state` resolve to pyautoattack."""
    import pyautoattack
    import pyautoattack.state

    sys.modules.setdefault("autoattack", pyautoattack)
    sys.modules.setdefault("autoattack.state", pyautoattack.state)


@functools.lru_cache(maxsize=None)
def import_robustbench() -> ModuleType:
    """The `robustbench` package, imported with the alias in place and its import-time warnings silenced."""
    install_autoattack_alias()
    with warnings.catch_warnings():
        # Only import-time noise from RobustBench's dependencies: pkg_resources'
        # deprecation notice, timm's moved-module notices, torch.jit's FutureWarning.
        warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        import robustbench
        import robustbench.utils  # noqa: F401  (load_model and the download helpers)
        import robustbench.model_zoo  # noqa: F401
    return robustbench


def model_dicts() -> dict:
    """RobustBench's model table: {BenchmarkDataset: {ThreatModel: {name: {'model': ctor, 'gdrive_id': ...}}}}."""
    import_robustbench()
    from robustbench.model_zoo import model_dicts as dicts

    return dicts


def enums(dataset: str, threat_model: str):
    """RobustBench's (BenchmarkDataset, ThreatModel) enum members for plain strings."""
    import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return BenchmarkDataset(dataset), ThreatModel(threat_model)


def zoo_record(name: str, dataset: str, threat_model: str) -> dict:
    """RobustBench's record for one model: its architecture constructor and checkpoint id(s)."""
    ds, tm = enums(dataset, threat_model)
    return model_dicts()[ds][tm][name]


def robustbench_utils() -> ModuleType:
    """`robustbench.utils` (load_model, download helpers, _safe_load_state_dict)."""
    import_robustbench()
    import robustbench.utils as rb_utils

    return rb_utils


def imagenet_standard_resnet50():
    """RobustBench's ImageNet `Standard_R50` architecture without its weights.

    RobustBench's own constructor asks torchvision for pretrained weights (a
    download); this is the same normalising wrapper around an untrained ResNet-50.
    """
    import_robustbench()
    from robustbench.model_zoo.architectures.utils_architectures import normalize_model
    from robustbench.model_zoo.imagenet import mu, sigma
    from torchvision import models

    return normalize_model(models.resnet50(weights=None), mu, sigma)
