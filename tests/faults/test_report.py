"""The fault table in docs/reliability.md is generated from the committed report, never typed."""

from __future__ import annotations

from report import DOC, PUBLISHED, doc_with_table, read_report, to_markdown


def test_doc_table_is_the_rendering_of_the_committed_report():
    assert PUBLISHED.is_file(), f"{PUBLISHED} is missing: run the fault suite, then tests/faults/report.py --publish"
    results, meta = read_report(PUBLISHED)
    text = DOC.read_text()
    assert doc_with_table(text, to_markdown(results, meta)) == text, (
        f"the table in {DOC} differs from {PUBLISHED}: regenerate it with "
        "`python tests/faults/report.py --publish docs/fault-report.json` (or from a fresh suite run's report)")
    runtime = [r for r in results if r.state_equal is not None]
    assert runtime and all(r.state_equal for r in runtime), "the published run has a scenario that ended unequal"
