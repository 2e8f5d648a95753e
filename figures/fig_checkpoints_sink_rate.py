"""Figure: sink rate (Gu et al.) across checkpoints.

Rebuild: python figures/fig_checkpoints_sink_rate.py --store STORE.h5 --out DIR
Drawing: attnscope.report.figures (FIGURES["checkpoints_sink_rate"]); all figures at once: attnscope figures --store S --out DIR
"""

import sys
from pathlib import Path

# use the attnscope of the checkout this script belongs to
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnscope.report.figures import script_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(script_main("checkpoints_sink_rate"))
