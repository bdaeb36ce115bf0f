"""The processes launcher's options, checked before any process starts: `--cpus` lists (parsed and
refused with the bad option named) and `--cpus` without `--launcher processes`. The launcher
itself, with its role processes, is tests/test_distributed_e2e.py (marker processes)."""

from __future__ import annotations

import re

import pytest
import yaml


def test_parse_cpus_reads_cpu_lists_and_names_the_bad_option():
    from dapo.entry.processes import parse_cpus
    from dapo.errors import ConfigError

    assert parse_cpus(["learner=0", "rollout,reward=1-2,4"], available={0, 1, 2, 3, 4}) == {
        "learner": {0}, "rollout": {1, 2, 4}, "reward": {1, 2, 4}}
    assert parse_cpus([" learner = 1 "], available={1}) == {"learner": {1}} and parse_cpus([], available=set()) == {}
    for bad, says in [(["learner=7"], "CPUs [7] are not available"), (["learner"], "use ROLE=CPUS"),
                      (["learner=3-1"], "the range 3-1 runs backwards: write 1-3"),
                      (["learner=1-"], "'1-' is not a CPU number"), (["learner=0,,1"], "'' is not a CPU number"),
                      (["learner=+1"], "'+1' is not a CPU number"), (["learner=1_0"], "'1_0' is not a CPU number"),
                      (["learner=0-99999999"], "CPU 99999999 cannot exist"), (["critic=0"], "unknown role 'critic'"),
                      (["learner=0", "learner,rollout=1"], "learner is pinned by an earlier --cpus too")]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            parse_cpus(bad, available={0, 1, 2, 3})


def test_cpus_option_needs_the_processes_launcher(tmp_path, capsys, run_doc):
    from dapo.cli import main as cli_main

    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(run_doc(preset="processes", model={"path": str(tmp_path)},
                                               data={"train": "train.jsonl"}, learner={"totalSteps": 1},
                                               checkpoint={"everySteps": 0})))
    assert cli_main(["run", str(run_file), "--cpus", "learner=0", "--output-dir", str(tmp_path / "x")]) == 2
    assert "use it with --launcher processes" in capsys.readouterr().err
