"""Speed and memory benchmarks behind ``ctp2mri bench preprocess | train | post-train | synthesize |
perfusion``.

Targets go into these commands, never into timed tests; each report states the machine,
the sizes and what was (not) counted.
"""

from ctp2mri.bench.post_train import bench_post_train, format_bench_post_train
from ctp2mri.bench.preprocess import bench_preprocess, format_bench
from ctp2mri.bench.synthesize import bench_synthesize, format_bench_synthesize
from ctp2mri.bench.synthetic_head import (
    AIR,
    BRAIN_LABELS,
    CSF,
    GREY,
    SCALP,
    SKULL,
    WHITE,
    centred_affine,
    head_labels,
    synthetic_ctp,
    write_synthetic_ctp,
)
from ctp2mri.bench.train import bench_train, format_bench_train

__all__ = [
    "AIR", "BRAIN_LABELS", "CSF", "GREY", "SCALP", "SKULL", "WHITE", "bench_post_train",
    "bench_preprocess", "bench_synthesize", "bench_train", "centred_affine", "format_bench",
    "format_bench_post_train", "format_bench_synthesize", "format_bench_train", "head_labels",
    "synthetic_ctp", "write_synthetic_ctp",
]
