"""The routing benchmarks' markdown report: each benchmark owns one marked section of it."""

from __future__ import annotations

from pathlib import Path

REPORT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "routing.md"


def write_section(name: str, text: str, report: Path = REPORT) -> None:
    """Replace what lies between ``<!-- name:start -->`` and ``<!-- name:end -->`` in the report."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    document = report.read_text()
    head, found, rest = document.partition(start)
    _, found_end, tail = rest.partition(end)
    if not found or not found_end:
        raise ValueError(f"{report} has no {start} ... {end} section")
    report.write_text(f"{head}{start}\n{text}\n{end}{tail}")
