"""`adt-ft bench`: throughput, pass counts, memory and FLOP cost-model ratios of every method and attack."""
from .runner import *  # noqa: F401,F403
from .runner import (CPU_DEFAULT_OVERRIDES, DEFAULT_ARCH, BenchResult, BenchRow, parse_list, parse_overrides,
                     run_benchmark)
