"""Look at a page the platform wrote as a reader would, in headless Chromium:

    python -m mergevq.entries.screenshot outputs/demo/index.html [--out outputs/demo/index.png] [--height 2400]

Prints every image and whether it loaded, any console message, and writes the screenshot; exits 1 when an
image did not load or the console said anything (needs Debian's chromium: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..runs.browser import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergevq.entries.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="screenshot PNG (default: beside the page)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    if not args.page.is_file():
        parser.error(f"{args.page} does not exist: run what writes it first (e.g. make demo)")
    try:
        seen = render(args.page, args.out or args.page.with_suffix(".png"), args.width, args.height)
    except FileNotFoundError as error:
        parser.error(str(error))
    for src, width in seen.images:
        print(f"{'ok     ' if width > 0 else 'MISSING'} {src} ({width} px wide)")
    for line in seen.console:
        print(f"console: {line}")
    print(f"screenshot: {seen.screenshot}")
    return 1 if seen.missing or seen.console or not seen.images else 0


if __name__ == "__main__":
    sys.exit(main())
