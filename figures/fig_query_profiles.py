"""Figure: sink mass and entropy vs query position per layer group (store tasks with query bins).

Rebuild: python figures/fig_query_profiles.py --store STORE.h5 --out DIR
Drawing: attnscope.report.figures (FIGURES["query_profiles"]); all figures at once: attnscope figures --store S --out DIR
"""

import sys
from pathlib import Path

# use the attnscope of the checkout this script belongs to
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnscope.report.figures import script_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(script_main("query_profiles"))
