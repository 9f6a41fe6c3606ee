"""Experiment configs: load `configs/NAME.py`, apply `--config.FIELD=VALUE` overrides, save them.

ml_collections' own flag parser raises tracebacks through absl; ours turns every mistake into one
line and names the closest valid key.
"""

import argparse
import ast
import copy
import difflib
import importlib.util
import json
from pathlib import Path

import ml_collections

from training.errors import UserError
from training.validate import validate


def load_config(path: str | Path) -> ml_collections.ConfigDict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass --config configs/NAME.py")
    spec = importlib.util.spec_from_file_location(f"pretrax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"{path} has no get_config(); a config file defines get_config()")
    return module.get_config()


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys += _all_keys(v, f"{prefix}{k}.")
    return keys


def _parse_value(text: str, old):
    if isinstance(old, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError("expected true or false")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, str):
        return text
    try:  # None, tuples, lists: a Python literal, else the plain string
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _shown(text: str) -> str:
    """Text for a one-line message: as typed, or quoted when it holds a newline or the like."""
    return text if text.isprintable() else repr(text)


def override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if node is None:
            break
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        close = difflib.get_close_matches(key, _all_keys(cfg), n=1, cutoff=0.5)
        hint = f"; did you mean --config.{close[0]}?" if close else ""
        raise UserError(f"unknown config key {key!r}{hint}")
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise UserError(f"config key {key!r} is a group; set one of its fields, e.g. "
                        f"--config.{key}.{next(iter(node[leaf].keys()))}=...")
    try:
        value = _parse_value(text, node[leaf])
    except ValueError as e:
        raise UserError(f"--config.{key}={_shown(text)}: {e} (current value {node[leaf]!r})") from None
    with node.ignore_type():
        node[leaf] = value


def with_overrides(cfg: ml_collections.ConfigDict, assignments) -> ml_collections.ConfigDict:
    """A copy of `cfg` with each (key, value text) of `assignments` applied (sweeps, searches)."""
    cfg = copy.deepcopy(cfg)
    for key, text in assignments:
        override(cfg, key, text)
    return cfg


def parse_cli(argv, default_config: str, description: str, extra_args=()):
    """Parse `[--config F] [--workdir D] [--config.KEY=VALUE ...]` plus trainer-specific flags.

    `extra_args` is a list of (flag, argparse kwargs). The config is validated (a one-line
    UserError for a value the run cannot use). Returns (config, args namespace);
    `args.overrides` maps each overridden key (e.g. "model.size") to its text, in order.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="configs/NAME.py")
    parser.add_argument("--workdir", default=None, help="run folder (default runs/<config name>)")
    for flag, kwargs in extra_args:
        parser.add_argument(flag, **kwargs)
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(args.config)
    it = iter(rest)
    args.overrides = {}
    for token in it:
        if not token.startswith("--config."):
            raise UserError(f"unknown argument {token!r}; see --help")
        key, eq, value = token[len("--config."):].partition("=")
        if not eq:
            value = next(it, None)
            if value is None:
                raise UserError(f"{_shown(token)} needs a value: {_shown(token)}=VALUE")
        override(cfg, key, value)
        args.overrides[key] = value
    validate(cfg)  # every value, before any work
    if args.workdir is None:
        args.workdir = str(Path("runs") / Path(args.config).stem)
    return cfg, args


def save_config(cfg: ml_collections.ConfigDict, path) -> None:
    """`path`: an epath.Path (local or gs://)."""
    path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
