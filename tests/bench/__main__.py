"""``make bench``: every benchmark, each printing ratios against its peer measured in the same run.

Run one with ``python -m tests.bench NAME`` (convert, parallel, variants, quants, quant_quality, archive, prefetch, staged, gpu, tp, export, gguf). Machines here are noisy: read
the medians and the ratios, not single absolute times.
"""

import importlib
import sys

BENCHES = ["convert", "parallel", "variants", "quants", "quant_quality", "archive", "prefetch", "staged", "tp", "export", "gguf"]

for name in sys.argv[1:] or BENCHES:
    module = importlib.import_module(f"tests.bench.bench_{name}")
    module.main()
