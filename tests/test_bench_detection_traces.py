"""bench/detection_traces.py: its section of docs/detection.md is replaced, the rest of the page kept."""

from __future__ import annotations


def test_section_is_replaced_and_the_rest_of_the_page_kept(tmp_path, load_bench):
    dt = load_bench("detection_traces")
    page = tmp_path / "detection.md"
    page.write_text(f"# Detection\n\ntable\n\n{dt.SECTION}\n\nold numbers\n\n## Later section\n\nkept\n")
    dt.write_section(page, [dt.SECTION, "", "new numbers", ""])
    text = page.read_text()
    assert "old numbers" not in text and "new numbers" in text
    assert text.startswith("# Detection\n\ntable\n") and text.rstrip().endswith("## Later section\n\nkept")
    assert text.count(dt.SECTION) == 1
    dt.write_section(page, [dt.SECTION, "", "newer", ""])  # again: still one section
    assert page.read_text().count(dt.SECTION) == 1 and "newer" in page.read_text()
