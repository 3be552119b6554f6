"""Shared helpers for the benchmarks: keep each benchmark's section of docs/benchmarks.md,
and run a measurement in a fresh process (`run_worker`).

Each benchmark owns the text between ``<!-- begin:NAME -->`` and ``<!-- end:NAME -->`` in
``docs/benchmarks.md`` and rewrites only that, so benchmarks can be re-run independently::

    from _report import write_section          # when run as ``python benchmarks/x.py``
    from benchmarks._report import write_section  # when run as ``python -m benchmarks.x``

    write_section("attribution", markdown)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Each section below is written by one script in `benchmarks/` (re-run it to refresh "
    "that section only). Timings depend on the machine and its load; each script says "
    "what it measured and how.\n"
)


def write_section(name: str, markdown: str, path: str | Path | None = None) -> Path:
    """Replace the ``name`` section of docs/benchmarks.md with ``markdown``.

    The section is the text between ``<!-- begin:NAME -->`` and ``<!-- end:NAME -->``; it is
    appended (and the file created, with a short header) when absent. The file is replaced
    atomically, so an interrupted run never leaves half a file.

    Args:
        name: section name, letters, digits, ``-`` and ``_`` only.
        markdown: the new body of the section (without the markers).
        path: the file to edit (default: the repository's docs/benchmarks.md).

    Returns:
        The path written.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"section name {name!r} must use letters, digits, '-' and '_' only")
    target = Path(path) if path is not None else DOCS
    text = target.read_text(encoding="utf-8") if target.exists() else ""
    if not text.strip():
        text = HEADER
    begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".benchmarks-", suffix=".md")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def run_worker(script: str | Path, spec: dict[str, Any], timeout: float = 3600
               ) -> dict[str, Any]:
    """Run ``script --worker SPEC`` in a fresh Python process (so one measurement leaves no
    memory behind for the next) and parse the JSON it prints last."""
    out = subprocess.run(
        [sys.executable, str(script), "--worker", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def proc_status_kib(field: str) -> int:
    """A kB field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) of this process."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
