"""run.json beside config.json: what a run resolved, apart from what it was given; and workdirs
from before run.json read as they are."""

import json

from training import run_record


def test_changes_are_the_leaves_resolved_or_added():
    given = {"family": "bert", "model": {"size": "tiny", "vocab_size": 0}, "data": {"seed": 0}}
    resolved = {"family": "bert", "model": {"size": "tiny", "vocab_size": 8192, "num_layers": 2},
                "data": {"seed": 0}}
    assert run_record.changes(given, resolved) == {"model": {"vocab_size": 8192, "num_layers": 2}}
    assert run_record.changes(given, given) == {}  # the negative control


def test_read_gives_the_resolved_config_and_old_workdirs_as_they_are(tmp_path):
    given = {"family": "bert", "model": {"vocab_size": 0}, "train": {"steps": 3}}
    resolved = {**given, "model": {"vocab_size": 8192}, "init": {"init": "/src", "kind": "checkpoint"}}
    run_record.write(tmp_path, given, resolved, "pretrain", resolved["init"])
    assert json.loads((tmp_path / "config.json").read_text()) == given  # as given
    config, record = run_record.read(tmp_path)
    assert config == resolved and record["trainer"] == "pretrain" and record["family"] == "bert"

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({**resolved, "method": {}}))
    assert run_record.read(old) == ({**resolved, "method": {}}, {"trainer": "finetune"})
