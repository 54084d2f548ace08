"""Open a local HTML page in headless Chromium (Debian's ``chromium`` package), as a reader would: which
images loaded, what the console said, and a screenshot.

The page is copied beside itself with a small script that records every ``<img>``'s natural width once
the page has loaded; ``--dump-dom`` returns the DOM after that, and console messages come on stderr."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")
PROBE = """<script>window.addEventListener('load', () => document.body.setAttribute('data-images',
JSON.stringify([...document.images].map(i => [i.getAttribute('src'), i.naturalWidth]))));</script>"""


@dataclass
class Rendered:
    """What Chromium saw: (src, natural width) per image, console messages, the screenshot's path."""

    images: list[tuple[str, int]]
    console: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    @property
    def missing(self) -> list[str]:
        """Images that did not load (natural width 0)."""
        return [src for src, width in self.images if width <= 0]


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def _run(chromium: str, profile: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def render(page: Path, screenshot: Path | None = None, width: int = 1280, height: int = 2400) -> Rendered:
    """Load ``page`` in headless Chromium -> the images it loaded, the console messages and (optionally)
    a screenshot of the first ``height`` pixels. FileNotFoundError when no Chromium is installed."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (looked for chromium, chromium-browser, google-chrome): "
                                "apt-get install chromium")
    page = Path(page).resolve()
    probe = page.with_name(f".{page.stem}.probe.html")
    text = page.read_text()
    probe.write_text(text.replace("</body>", PROBE + "</body>") if "</body>" in text else text + PROBE)
    try:
        with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
            dom = _run(chromium, profile, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
                       "--dump-dom", probe.as_uri())
            if screenshot is not None:
                screenshot = Path(screenshot).resolve()
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                _run(chromium, profile, f"--window-size={width},{height}", f"--screenshot={screenshot}", page.as_uri())
    finally:
        probe.unlink(missing_ok=True)
    found = re.search(r'data-images="([^"]*)"', dom.stdout)
    images = [tuple(item) for item in json.loads(html.unescape(found.group(1)))] if found else []
    # Chromium logs every console message (log, warning or error alike) as ":CONSOLE"; the pages have no
    # script of their own, so any message is a defect
    messages = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return Rendered(images, messages, screenshot if screenshot and screenshot.is_file() else None)
