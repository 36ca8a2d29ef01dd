"""benchmarks/RESULTS.md is generated from benchmarks/results/best.csv: the page cannot drift from the data."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def plot_results():
    spec = importlib.util.spec_from_file_location("plot_results", BENCH / "plot_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(plot_results):
    return plot_results.load_rows(BENCH / "results" / "best.csv")


def headings(text: str) -> list[str]:
    return [re.sub(r"^#+ ", "", line) for line in text.splitlines() if re.match(r"#{1,6} ", line)]


def test_every_method_has_a_section_and_best_rows(plot_results, rows):
    page = headings((BENCH / "RESULTS.md").read_text())
    for method, title in plot_results.METHODS.items():
        assert title in page, f"RESULTS.md has no section for {method}"
        assert any(r["method"] == method and r["role"] == "best" for r in rows), f"no best row for {method}"


def test_page_tables_equal_what_the_data_generates(plot_results, rows):
    on_page = plot_results.page_blocks((BENCH / "RESULTS.md").read_text())
    generated = plot_results.generated_blocks(rows)
    assert set(on_page) == set(generated)
    for name, body in generated.items():
        assert on_page[name] == body, f"block {name} is stale: run python benchmarks/plot_results.py --update-page"


def test_update_page_is_a_fixed_point(plot_results, rows):
    text = (BENCH / "RESULTS.md").read_text()
    assert plot_results.update_page(text, plot_results.generated_blocks(rows)) == text


def test_every_row_points_at_a_journal_section(plot_results, rows):
    journal = set(headings((BENCH / "JOURNAL.md").read_text()))
    for row in rows:
        assert row["section"] in journal, f"{row['method']} row points at a missing section: {row['section']!r}"
        assert row["command"] and row["n"] and row["date"]
        assert int(row["n"]) >= 1


def test_links_into_the_page_resolve(plot_results):
    anchors = {plot_results.slug(h) for h in headings((BENCH / "RESULTS.md").read_text())}
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\(benchmarks/RESULTS\.md#([\w-]+)\)", readme)
    assert links, "the README's method table links to the results page"
    assert set(links) <= anchors


def test_links_into_the_journal_resolve(plot_results):
    anchors = {plot_results.slug(h) for h in headings((BENCH / "JOURNAL.md").read_text())}
    for page in (BENCH / "RESULTS.md", ROOT / "docs" / "engine.md"):
        links = re.findall(r"JOURNAL\.md#([\w-]+)\)", page.read_text())
        assert set(links) <= anchors, f"{page.name}: {sorted(set(links) - anchors)}"


def test_the_numbers_read_the_way_the_page_says(plot_results):
    row = {"kept_tokens": "1024", "in_tokens": "7995", "compression": "", "budget": "1024", "kv_mb": "28.5",
           "kv_full_mb": "437.7", "acc": "50", "acc_full": "100", "metric": "match"}
    assert plot_results.compression(row) == pytest.approx(7995 / 1024)
    assert plot_results._kv(row) == "1/15"
    assert plot_results.relative_accuracy(row) == 0.5
    assert plot_results.relative_accuracy({**row, "acc_full": "4.9"}) is None  # full context cannot do the task
    assert plot_results.compression({**row, "kept_tokens": ""}) == pytest.approx(7995 / 1024)  # from the budget
    assert plot_results.slug("2026-11-29 (22:00 UTC) — H200 again: `x`") == "2026-11-29-2200-utc--h200-again-x"


def test_the_script_writes_both_plots(plot_results, tmp_path):
    assert plot_results.main(["--out", str(tmp_path)]) == 0
    for name in ("accuracy_vs_compression.png", "ttft_vs_length.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
