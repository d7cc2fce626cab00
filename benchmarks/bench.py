"""Benchmark jvlm against the transformers reference path on this machine; see ``jvlm bench --help``.

    python benchmarks/bench.py --output BENCHMARKS.md
"""

import sys

from jvlm.bench import main

if __name__ == "__main__":
    sys.exit(main())
