"""The fault-injection suite's measured table (docs/reliability.md, "Fault injection").

Every scenario of tests/faults/ records one `FaultResult`; at the end of the session
(tests/faults/conftest.py) the results are written as ``fault-report.json`` and
``fault-report.md`` into ``$DAPO_FAULT_REPORT_DIR`` (default ``.pytest_cache/dapo-faults/`` under
the repository). ``python tests/faults/report.py [REPORT.json]`` prints the markdown table of a
written report again (default: the last one).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / ".pytest_cache" / "dapo-faults"
COMMAND = ".venv/bin/pytest tests/faults"


@dataclass
class FaultResult:
    """One scenario's outcome. ``data_lost``: training steps whose prompts differ from (or are
    missing from, or repeat) an uninterrupted run's, or pods / checkpoints lost or duplicated for
    the operator scenarios; must be 0. ``recover_s``: seconds from the injection until the run
    was back where it was (what exactly is in ``recovered_when``)."""

    scenario: str
    injected: str
    outcome: str
    data_lost: int
    recover_s: float | None
    recovered_when: str
    test: str = ""


RESULTS: list[FaultResult] = []


def record(result: FaultResult) -> FaultResult:
    RESULTS.append(result)
    return result


def report_dir() -> Path:
    return Path(os.environ.get("DAPO_FAULT_REPORT_DIR") or DEFAULT_DIR)


def to_markdown(results: list[FaultResult], meta: dict) -> str:
    """The table of docs/reliability.md plus the totals line."""
    lines = ["| scenario | what was injected | outcome | data lost | time to recover |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        recover = "n/a" if r.recover_s is None else f"{r.recover_s:.1f} s ({r.recovered_when})"
        lines.append(f"| {r.scenario} | {r.injected} | {r.outcome} | {r.data_lost} | {recover} |")
    lines.append("")
    lines.append(totals_line(results, meta))
    return "\n".join(lines) + "\n"


def totals_line(results: list[FaultResult], meta: dict) -> str:
    lost = sum(r.data_lost for r in results)
    return (f"Totals: {len(results)} scenarios, {sum(1 for r in results if r.data_lost == 0)} recovered with "
            f"nothing lost, data lost {lost}; suite wall time {meta.get('wall_s', 0):.0f} s on "
            f"{meta.get('cpus', '?')} CPU cores ({meta.get('machine', '?')}), command `{COMMAND}`.")


def write_report(results: list[FaultResult], wall_s: float, folder: Path | None = None) -> tuple[Path, Path]:
    folder = Path(folder or report_dir())
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"wall_s": wall_s, "cpus": os.cpu_count(), "machine": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version(), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    json_path, md_path = folder / "fault-report.json", folder / "fault-report.md"
    json_path.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    md_path.write_text(to_markdown(results, meta))
    return json_path, md_path


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else report_dir() / "fault-report.json"
    if not path.is_file():
        print(f"{path}: no report; run `{COMMAND}` first (or set DAPO_FAULT_REPORT_DIR)", file=sys.stderr)
        return 2
    doc = json.loads(path.read_text())
    print(to_markdown([FaultResult(**r) for r in doc["results"]], doc["meta"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
