"""Training: the one loop every method shares, run directories with exact resume, and settings."""
from .loop import *  # noqa: F401,F403
from .loop import (DEFAULT_LR, RESUME_OVERRIDABLE, RunResult, _SeededAugmentation, build_config, default_loss,
                   lr_at, resolve_loss, train, validate_config)
