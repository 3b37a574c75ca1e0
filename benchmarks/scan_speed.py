"""Reference vs fast CLIP-Inspector scan speed (thin wrapper over gatekeeper.bench.speed).

    python benchmarks/scan_speed.py --quick [--classes 50] [--pool 64] [--device cpu] [--threads 1]

The last line printed is ``speedup <ratio>x``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gatekeeper.bench.speed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
