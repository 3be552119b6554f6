"""Execute every notebook in a folder top to bottom (CI), failing on the first error, then
check that each notebook's printed sentences agree with its numbers (scripts/notebook_claims.py).

Usage: ``python scripts/run_notebooks.py notebooks [--timeout 600] [--only NAME ...]``.
Outputs are not written back: committed notebooks stay stripped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook_claims import check  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--only", nargs="+", default=None, help="notebook file names to run")
    args = parser.parse_args()
    notebooks = sorted(p for p in args.folder.glob("*.ipynb")
                       if args.only is None or p.name in args.only)
    if not notebooks:
        print(f"no notebooks in {args.folder}")
        return 0
    for path in notebooks:
        start = time.perf_counter()
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(
            notebook, timeout=args.timeout, kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
        problems = check(path.name, notebook)
        for problem in problems:
            print(f"{path.name}: its text disagrees with its output: {problem}", file=sys.stderr)
        if problems:
            return 1
        print(f"{path.name}: ok in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
