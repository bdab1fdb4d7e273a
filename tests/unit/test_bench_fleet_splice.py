"""bench/fleet.py's `splice`: `make bench-fleet` replaces only the results between the markers of
bench/fleet-results.md, keeping the prose around them."""

from __future__ import annotations

from pathlib import Path

from bench.fleet import BEGIN, END, splice

ROOT = Path(__file__).resolve().parents[2]


def test_the_table_between_the_markers_is_replaced_and_the_prose_kept() -> None:
    doc = f"# title\n\nintro\n\n{BEGIN}\nold table\n{END}\n\nreading the table\n"
    assert splice(doc, "new table\n") == f"# title\n\nintro\n\n{BEGIN}\nnew table\n{END}\n\nreading the table\n"


def test_a_new_file_or_one_without_markers_gets_the_text_alone() -> None:
    assert splice(None, "t\n") == "t\n"
    assert splice("no markers here\n", "t\n") == "t\n"
    assert splice(f"{END} before {BEGIN}\n", "t\n") == "t\n"


def test_the_published_results_have_the_markers() -> None:
    text = (ROOT / "bench" / "fleet-results.md").read_text()
    assert text.index(BEGIN) < text.index(END) < text.index("## Targets")
