"""Headless-Chromium screenshots of sections of an HTML report, for docs/visualisation.md.

Renders the page at each width (the plotly figures resize to it) and keeps one band per
named section: from the ``<h2>`` whose text starts with the name down to the next ``<h2>``
(or ``HEIGHT`` pixels, when given), so the docs show each part at full resolution without
one very tall image::

    python scripts/report_screenshots.py runs/demo/report.html docs/img --prefix report-after
    python scripts/report_screenshots.py report.html /tmp/shots --sections "Evolution:830"

The band is cut while rendering: a copy of the report reports where its headings are, then
the report sits in an iframe as wide as the window, shifted up by the band's first row, in
a window as tall as the band. Needs Debian's ``chromium`` (``apt-get install -y
chromium``); standard library otherwise.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=20000"]
DEFAULT_SECTIONS = ("Evolution:830", "Circuit change")
#: reports every <h2>'s text and top (CSS pixels) on the console, once the page has drawn
_PROBE = ("<script>window.addEventListener('load', function () { console.log('HEADINGS|' + "
          "JSON.stringify(Array.from(document.querySelectorAll('h2')).map(function (h) {"
          " return [h.textContent, h.getBoundingClientRect().top + window.scrollY]; }))); });"
          "</script></body>")


def browser() -> str:
    """The Chromium executable, or exit saying how to install it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise SystemExit("chromium not found: apt-get install -y chromium")


def _run(page: Path, work: Path, width: int, height: int, *extra: str) -> str:
    done = subprocess.run([browser(), *FLAGS, f"--user-data-dir={work / 'profile'}",
                           f"--window-size={width},{height}", *extra, page.as_uri()],
                          check=True, capture_output=True, text=True, timeout=300)
    return done.stderr


def headings(page: Path, width: int, work: Path) -> list[tuple[str, float]]:
    """Each ``<h2>``'s text and top at ``width``."""
    probe = work / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE), "utf-8")
    log = _run(probe, work, width, 1000, "--dump-dom", "--enable-logging=stderr", "--v=0")
    found = re.search(r"HEADINGS\|(\[.*\])\"", log)
    if found is None:
        raise SystemExit(f"the page did not report its headings at width {width}")
    return [(text, float(top)) for text, top in json.loads(found.group(1).replace('\\"', '"'))]


def band(page: Path, out: Path, width: int, first: int, last: int, work: Path) -> None:
    """Screenshot rows ``first`` to ``last`` (CSS pixels) of ``page`` rendered ``width`` wide."""
    frame = work / "band.html"
    frame.write_text(
        "<!DOCTYPE html><html><body style=\"margin:0;overflow:hidden\">"
        f"<iframe src=\"{html.escape(page.resolve().as_uri())}\" style=\"border:0;"
        f"position:absolute;left:0;top:-{first}px;width:{width}px;height:{last + 50}px\">"
        "</iframe></body></html>")
    _run(frame, work, width, last - first, "--allow-file-access-from-files",
         f"--screenshot={out.resolve()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="the report.html to render")
    parser.add_argument("out", type=Path, help="folder for the PNGs")
    parser.add_argument("--prefix", default="report", help="file name prefix")
    parser.add_argument("--widths", default="1000,1400", help="window widths, comma-separated")
    parser.add_argument("--sections", nargs="+", default=list(DEFAULT_SECTIONS),
                        help="HEADING[:HEIGHT]: a section by the start of its <h2> text, and "
                        "at most HEIGHT pixels of it")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for width in map(int, args.widths.split(",")):
            tops = headings(args.page, width, work)
            for spec in args.sections:
                name, _, height = spec.partition(":")
                index = next((i for i, (text, _) in enumerate(tops) if text.startswith(name)),
                             None)
                if index is None:
                    raise SystemExit(f"no section {name!r}; the page has "
                                     f"{[text for text, _ in tops]}")
                first = int(tops[index][1]) - 12
                last = int(tops[index + 1][1]) - 16 if index + 1 < len(tops) else first + 1500
                if height:
                    last = min(last, first + int(height))
                slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
                target = args.out / f"{args.prefix}-{width}-{slug}.png"
                band(args.page, target, width, first, last, work)
                print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
