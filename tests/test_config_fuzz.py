"""Fuzzing the config space through the command line: a wrong value is one UserError line.

Seeded and bounded in time: every field of every config in configs/ gets wrong values (negative,
zero, huge, wrong type, NaN, empty, unknown choice, ...) one at a time, then a few together.
Each `parse_cli` either returns a config that passes `validate` or raises one UserError line
that names the field; any other exception fails the test.
"""

import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from training.config import load_config, parse_cli
from training.errors import UserError
from training.validate import validate

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                 if p.name != "__init__.py")
WRONG = ["-1", "-5", "0", "-0", "1", "0.5", "1.5", "2", "-2", "1e30", "-1e30", "1e-300",
         "99999999999999999999", "2147483648", "nan", "-nan", "inf", "-inf", "", " ", "abc",
         "true", "None", "[1, 2]", "{}", "0x10", "1_000", "\u0661\u0662", "1\n2", "tiny ",
         "TINY", "huge", "glue/xyz", "files:", "tfds:", "-1.0", "3.0"]
BUDGET_S = 2.5  # whole rounds of one value per field until this is spent (at least one round)


def leaves(cfg: ml_collections.ConfigDict, prefix="") -> list[str]:
    out = []
    for k, v in cfg.items():
        out += leaves(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [prefix + k]
    return out


def random_value(rng: np.random.Generator) -> str:
    kind = rng.integers(4)
    if kind == 0:
        return str(WRONG[rng.integers(len(WRONG))])
    if kind == 1:
        return str(int(rng.integers(-10, 10)) * 10 ** int(rng.integers(0, 20)))
    if kind == 2:
        return repr(float(rng.normal() * 10.0 ** rng.integers(-8, 12)))
    return str(WRONG[rng.integers(len(WRONG))]) + str(WRONG[rng.integers(len(WRONG))])


def check(config_file: Path, assignments: list[tuple[str, str]]) -> str:
    """'ok' or 'error'; anything but a config or one UserError line fails."""
    argv = ["--config", str(config_file)] + [f"--config.{k}={v}" for k, v in assignments]
    try:
        cfg, _ = parse_cli(argv, str(config_file), "fuzz")
    except UserError as e:
        text = str(e)
        assert text and "\n" not in text, (argv, text)
        if len(assignments) == 1:  # the field it refuses is named (or the one it rests on)
            assert "." in text, (argv, text)
        return "error"
    except Exception as e:  # noqa: BLE001  the point of the test
        pytest.fail(f"{argv} raised {type(e).__name__}: {e}")
    validate(cfg)
    return "ok"


def test_wrong_values_give_a_config_or_one_line():
    rng = np.random.default_rng(20261201)
    fields = [(c, key) for c in CONFIGS for key in leaves(load_config(c))]
    outcomes = {"ok": 0, "error": 0}
    deadline, rounds = time.monotonic() + BUDGET_S, 0
    while rounds == 0 or time.monotonic() < deadline:
        for config_file, key in fields:
            outcomes[check(config_file, [(key, random_value(rng))])] += 1
        for _ in range(50):  # several fields at once reach the rules between fields
            config_file = CONFIGS[rng.integers(len(CONFIGS))]
            keys = leaves(load_config(config_file))
            picked = rng.choice(len(keys), size=3, replace=False)
            outcomes[check(config_file, [(keys[i], random_value(rng)) for i in picked])] += 1
        rounds += 1
    assert outcomes["error"] > outcomes["ok"] > 0, outcomes  # it did reach both outcomes


@pytest.mark.parametrize("value", ["-1", "nan", ""])
def test_every_field_of_every_config(value):
    """Every field, one fixed wrong value each: the whole table is reached every run."""
    for config_file in CONFIGS:
        for key in leaves(load_config(config_file)):
            check(config_file, [(key, value)])


def outside(rule) -> list[str]:
    """Values outside a field's declared range (training/validate.py's rule for it)."""
    from training import validate as v
    if isinstance(rule, v.Int):
        below = min([rule.lo, *[k for k in rule.special if isinstance(k, int)]]) - 1
        return [str(below), str(rule.hi + 1), "1.5", "abc"]
    if isinstance(rule, v.Real):
        values = ["nan", "abc"]
        if np.isfinite(rule.lo):
            values.append(repr(rule.lo if rule.lo_open else rule.lo - 1.0))
        values.append(repr(rule.hi if rule.hi_open else rule.hi + 1.0) if np.isfinite(rule.hi) else "inf")
        return values
    if isinstance(rule, v.Bool):
        return ["maybe"]
    if isinstance(rule, v.Choice):
        return ["no-such-choice"]
    if isinstance(rule, v.Text) and (rule.names or rule.prefixes):
        return ["no-such-name"]
    if isinstance(rule, v.Text) and rule.required:
        return [""]
    return []  # any string


def test_every_value_outside_a_fields_range_is_refused():
    """Every field of every config, at values its declared rule excludes: refused, in one line
    that names the field (the fuzz above only shows that nothing crashes)."""
    from training.validate import OPTIONAL, table_for
    refused = 0
    for config_file in CONFIGS:
        config = load_config(config_file)
        table = {**table_for(config), **OPTIONAL}  # fields any config may have (search.space)
        assert check(config_file, []) == "ok"  # the control: the config as it is passes
        for key in leaves(config):
            for value in outside(table[key]):
                argv = ["--config", str(config_file), f"--config.{key}={value}"]
                with pytest.raises(UserError) as e:
                    cfg, _ = parse_cli(argv, str(config_file), "fuzz")
                    validate(cfg)
                assert "\n" not in str(e.value) and key.rsplit(".", 1)[-1] in str(e.value), (argv, str(e.value))
                refused += 1
    assert refused > 500, refused
