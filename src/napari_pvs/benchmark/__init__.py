"""Product benchmarks that exercise the whole loop (no Qt): labelling efficiency of the
annotation queue (:mod:`.protocol`, with :mod:`.config`, :mod:`.cases`, :mod:`.annotator`,
:mod:`.scoring`, :mod:`.report`) and the shifted data it runs on (:mod:`.data`)."""

from napari_pvs.benchmark.cases import Case, load_case, tissue_box
from napari_pvs.benchmark.config import BenchmarkConfig, StrategySpec, parse_strategies
from napari_pvs.benchmark.data import PRESETS, describe_shift, make_benchmark_data
from napari_pvs.benchmark.protocol import BenchmarkResult, run_benchmark
from napari_pvs.benchmark.report import (
    FULL,
    estimate_minutes,
    final_lines,
    format_table,
    summarise,
)
from napari_pvs.benchmark.scoring import score

__all__ = [
    "FULL",
    "PRESETS",
    "BenchmarkConfig",
    "BenchmarkResult",
    "Case",
    "StrategySpec",
    "describe_shift",
    "estimate_minutes",
    "final_lines",
    "format_table",
    "load_case",
    "make_benchmark_data",
    "parse_strategies",
    "run_benchmark",
    "score",
    "summarise",
    "tissue_box",
]
