"""Figure: long-context score vs sink mass and vs sink rate (Gu et al.), side by side.

Rebuild: python figures/fig_score_vs_sinks.py --store STORE.h5 --out DIR
Drawing: attnscope.report.figures (FIGURES["score_vs_sinks"]); all figures at once: attnscope figures --store S --out DIR
"""

import sys
from pathlib import Path

# use the attnscope of the checkout this script belongs to
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnscope.report.figures import script_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(script_main("score_vs_sinks"))
