"""What a run resolved, kept apart from what it was given: workdir/run.json beside config.json.

config.json is the config as given (file and flags). run.json says which trainer wrote the
workdir, its family, the `--init` source, and what its family's setup resolved (the vocabulary,
the shape an `--init` source fixes, image statistics): a setup returns that record, nested like
the config, and never writes into the config it was given (`view` is the config as resolved,
for the setup's own use). Every reader
(`--init`, export, resuming a fine-tuning source) sees a run through `read`: config.json with
run.json's values over it, the source as `init`. A workdir from before run.json has config.json
only, already resolved in place, and reads as it is.
"""

from __future__ import annotations

import json

import ml_collections

from infra import storage
from training.validate import trainer

FILE = "run.json"


def changes(given: dict, resolved: dict) -> dict:
    """The leaves of `resolved` that `given` lacks or has with another value, nested as in both."""
    out = {}
    for key, value in resolved.items():
        if isinstance(value, dict) and isinstance(given.get(key), dict):
            if inner := changes(given[key], value):
                out[key] = inner
        elif key not in given or given[key] != value:
            out[key] = value
    return out


def merged(base: dict, over: dict) -> dict:
    """`base` with `over`'s leaves over it (neither is changed)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def view(config, resolved: dict) -> ml_collections.ConfigDict:
    """A new config: `config` with what a setup `resolved` over it (`config` stays as given)."""
    out = ml_collections.ConfigDict(merged(config.to_dict(), resolved))
    out.lock()
    return out


def write(folder, given: dict, resolved: dict, trainer: str, source: dict | None) -> None:
    """config.json (`given`) and run.json (what the setup `resolved` changed of it, `trainer`,
    `source`)."""
    folder = storage.as_path(folder)
    resolved = {k: v for k, v in resolved.items() if k != "init"}  # the source has its own key
    # a setup resolves the family only where it differs from the config's (as given: most runs)
    record = {"trainer": trainer, "family": resolved.get("family", given.get("family")), "source": source,
              "resolved": changes(given, resolved)}
    (folder / "config.json").write_text(json.dumps(given, indent=2, sort_keys=True, default=str) + "\n")
    (folder / FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def read(folder) -> tuple[dict, dict]:
    """(the run's config as resolved, with the source as `init`; its run.json record, for a
    workdir from before run.json only the trainer its config implies). config.json must exist."""
    folder = storage.as_path(folder)
    config = json.loads((folder / "config.json").read_text())
    if not (folder / FILE).is_file():
        return config, {"trainer": trainer(config)}
    record = json.loads((folder / FILE).read_text())
    config = merged(config, record.get("resolved") or {})
    if record.get("source") is not None:
        config["init"] = record["source"]
    return config, record
