"""One RESULTS.md for every benchmark: each script replaces only its own marked section."""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(script: str, text: str, path: Path = RESULTS) -> None:
    """Put ``text`` between this script's markers in RESULTS.md (appended the first time)."""
    begin, end = f"<!-- begin {script} -->", f"<!-- end {script} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def publish(script: str, title: str, body: list[str], write: bool) -> str:
    """Print a section (title, the command that made it, ``body`` lines) and, with ``write``, store it."""
    text = "\n".join([title, "", f"`python benchmarks/{script} {' '.join(sys.argv[1:])}`", "", *body])
    print("\n" + text)
    if write:
        write_section(script, text)
    return text
