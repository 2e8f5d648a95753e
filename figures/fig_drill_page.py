"""Figure: the drill-down page (`attnscope drill`) for SmolLM2 on the shipped prose, and a
screenshot of it in headless Chromium.

Rebuild: python figures/fig_drill_page.py --out docs/figures/drilldown
Writes drill_page_smollm2.html (the page itself: open it in any browser, offline) and
drill_page_smollm2.png (the page as first opened, with the layer and head given here selected).
"""

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# use the attnscope of the checkout this script belongs to
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnscope  # noqa: E402
from attnscope.errors import AttnscopeError  # noqa: E402
from attnscope.files import atomic_path  # noqa: E402
from attnscope.probing.texts import prose  # noqa: E402
from attnscope.report.drilldown import write_drilldown  # noqa: E402

_SELECT = """<script>
(() => { const pick = (id, v) => { const s = document.getElementById(id); s.value = String(v);
  s.dispatchEvent(new Event('change')); };
  pick('layer', %d); pick('head', %d); })();
</script></body>"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="figures/fig_drill_page.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the shipped prose (default 2048)")
    p.add_argument("--queries", default="1000,2047", help="query positions (default 1000,2047)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--layer", type=int, default=18, help="layer shown in the screenshot")
    p.add_argument("--head", type=int, default=8, help="head shown in the screenshot")
    p.add_argument("--overwrite", action="store_true", help="replace the page and the screenshot")
    args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in
                                   ["figures/fig_drill_page.py", *(sys.argv[1:] if argv is None else argv)])
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        print("error: the screenshot needs headless Chromium (Debian: apt-get install -y chromium)", file=sys.stderr)
        return 2
    out = Path(args.out)
    page, shot = out / "drill_page_smollm2.html", out / "drill_page_smollm2.png"
    try:
        if shot.exists() and not args.overwrite:
            raise AttnscopeError(f"{shot} already exists; pass --overwrite to replace it")
        lm = attnscope.load("smollm2")
        ids = lm.tokenizer(prose())["input_ids"][:args.tokens]
        ds = attnscope.topk_keys(lm, token_ids=ids, queries=args.queries, k=args.k)
        write_drilldown(ds, page, command=command, overwrite=args.overwrite)
    except AttnscopeError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / "view.html"
        view.write_text(page.read_text(encoding="utf-8").replace(
            "</body>", _SELECT % (list(ds["layer"].values).index(args.layer), args.head)), encoding="utf-8")
        png = Path(tmp) / "shot.png"
        r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            "--no-first-run", f"--user-data-dir={Path(tmp) / 'profile'}", "--hide-scrollbars",
                            "--window-size=1280,1500", "--virtual-time-budget=5000",
                            f"--screenshot={png}", view.as_uri()], capture_output=True, text=True, timeout=180)
        if not png.is_file() or not png.stat().st_size:
            print(f"error: Chromium made no screenshot: {r.stderr[-500:]}", file=sys.stderr)
            return 1
        with atomic_path(shot) as target:
            target.write_bytes(png.read_bytes())
    print(f"{page} ({page.stat().st_size / 1e6:.2f} MB)")
    print(shot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
