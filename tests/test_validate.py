"""Config validation: one table, every config in configs/ passes it, wrong values are one line."""

import pytest

from configs import bert_tiny, finetune_rt_polarity
from data.corpora import SOURCES
from finetune.__main__ import main as finetune_main
from finetune.image import POOLINGS as IMAGE_POOLINGS
from finetune.tasks import TASKS
from finetune.text import POOLINGS
from models.bert import SIZES
from models.layers import REMAT_POLICIES
from models.layers import ATTENTIONS
from models.mae import SIZES as MAE_SIZES
from models.quantize import QTYPES
from pretrain.__main__ import main as pretrain_main
from data.preparation import OBJECTIVES
from test_config_fuzz import CONFIGS
from infra import rules
from models import family as families
from training import validate as v
from training.config import load_config, parse_cli
from training.errors import UserError

PRETRAIN_CONFIG = "configs/bert_tiny.py"
FINETUNE_CONFIG = "configs/finetune_rt_polarity.py"


def one_line(main, capsys, *flags) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def refused(config_file, *flags) -> str:
    with pytest.raises(UserError) as e:
        parse_cli(["--config", config_file, *flags], config_file, "test")
    return str(e.value)


@pytest.mark.parametrize("config_file", CONFIGS, ids=lambda p: p.stem)
def test_every_config_passes_and_every_field_has_a_rule(config_file):
    config = load_config(config_file)
    v.validate(config)  # no unknown, no missing field, every value allowed
    table = v.table_for(config)
    trainer = "finetune" if config_file.stem.startswith("finetune") else "pretrain"
    assert v.trainer(config) == trainer
    assert set(families.get(config.family).checks[trainer]) <= set(table)


def test_the_issue_examples_are_one_line_naming_key_value_and_range(capsys):
    err = one_line(pretrain_main, capsys, "--config.train.steps=-5")
    assert "train.steps=-5" in err and "integer >= 1" in err
    err = one_line(pretrain_main, capsys, "--config.data.mask_prob=1.5")
    assert "data.mask_prob=1.5" in err and "(0, 1]" in err
    err = one_line(pretrain_main, capsys, "--config.train.batch_size=0")
    assert "train.batch_size=0" in err and "integer >= 1" in err
    err = one_line(finetune_main, capsys, "--init", "none", "--config.method.layer_decay=0")
    assert "method.layer_decay=0" in err and "(0, 1]" in err


def test_a_short_run_keeps_the_default_warmup():
    config, _ = parse_cli(["--config.train.steps=10"], PRETRAIN_CONFIG, "test")
    assert config.optim.warmup_steps > config.train.steps  # the schedule clips it
    config, _ = parse_cli(["--config.train.steps=3", "--config.optim.warmup_steps=100"],
                          FINETUNE_CONFIG, "test")
    assert config.train.steps == 3


@pytest.mark.parametrize("flag, expected", [
    ("--config.optim.lr=nan", "optim.lr=nan: expected a finite number >= 0"),
    ("--config.optim.lr=inf", "optim.lr=inf"),
    ("--config.model.dropout=1.0", "model.dropout=1.0: expected a number in [0, 1)"),
    ("--config.optim.decay=cosin", "unknown decay schedule 'cosin' for optim.decay; choose one of: linear"),
    ("--config.data.objective=mlm", "unknown pretraining objective 'mlm'"),
    ("--config.model.dtype=fp32", "choose one of: float32, bfloat16, float16"),
    ("--config.data.source=files:", "news, pydocs, files:PATTERN, tfds:NAME[:SPLIT], task:NAME"),
    ("--config.data.data_dir=", "data.data_dir=''"),
    ("--config.eval.every_steps=0", "eval.every_steps=0"),       # was a ZeroDivisionError
    ("--config.mesh.fsdp=0", "-1 (all remaining devices)"),
    ("--config.train.seed=-1", "train.seed=-1"),
    ("--config.data.max_predictions=65", "exceeds data.max_seq_len=64"),
    ("--config.data.max_seq_len=1024", "exceeds model.max_position=512"),
    ("--config.train.grad_accum=3", "does not split into train.grad_accum=3"),
])
def test_pretraining_values_refused(flag, expected):
    assert expected in refused(PRETRAIN_CONFIG, flag)


def test_finetuning_rules_differ_from_pretraining():
    # 0 and -1 mean something in fine-tuning (steps from epochs, warmup from the ratio).
    parse_cli(["--config.train.steps=0", "--config.optim.warmup_steps=-1",
               "--config.eval.every_steps=0", "--config.method.freeze_bottom=-1"], FINETUNE_CONFIG, "t")
    assert "train.steps=0 and train.epochs=0" in refused(FINETUNE_CONFIG, "--config.train.epochs=0")
    assert "unknown task 'sst9'" in refused(FINETUNE_CONFIG, "--config.data.task=sst9")
    assert "optim.warmup_steps=-2" in refused(FINETUNE_CONFIG, "--config.optim.warmup_steps=-2")
    assert "method.label_smoothing=1.0" in refused(FINETUNE_CONFIG, "--config.method.label_smoothing=1")


def test_unknown_and_missing_fields_in_a_config_file(tmp_path):
    extra = tmp_path / "extra.py"
    extra.write_text("from configs import bert_tiny\n\ndef get_config():\n"
                     "    c = bert_tiny.get_config()\n    c.train.bach_size = 8\n    return c\n")
    assert "train.bach_size is not used" in refused(str(extra))
    config = bert_tiny.get_config()
    del config.data["prefetch"]
    with pytest.raises(UserError, match="no field data.prefetch"):
        v.validate(config)


def test_validate_checks_types_of_values_set_in_code():
    config = finetune_rt_polarity.get_config()
    with config.ignore_type():
        config.train.steps = 5.0
    with pytest.raises(UserError, match=r"train.steps=5.0: expected an integer"):
        v.validate(config)
    config = finetune_rt_polarity.get_config()
    with config.ignore_type():
        config.model.remat = 1
    with pytest.raises(UserError, match="unknown remat policy 1 for model.remat; choose one of: none, full, dots"):
        v.validate(config)
    with config.ignore_type():
        config.model.remat = "dots"
    config.optim.lr = 1  # an int learning rate is a number
    v.validate(config)


def test_choice_lists_match_their_owners():
    bert, mae = families.get("bert").checks, families.get("mae").checks
    assert bert["pretrain"]["model.size"].options == tuple(SIZES)
    assert mae["pretrain"]["model.size"].options == tuple(MAE_SIZES)
    assert bert["pretrain"]["model.attention"].options == ATTENTIONS
    assert rules.REMATS == tuple(REMAT_POLICIES)
    assert set(rules.TASKS + rules.IMAGE_TASKS) == set(TASKS)
    assert rules.POOLINGS == tuple(POOLINGS) == tuple(IMAGE_POOLINGS)
    assert rules.OBJECTIVES == tuple(OBJECTIVES)
    assert rules.QUANTIZE == ("none", *QTYPES)
    assert {"news", "pydocs"} == set(bert["pretrain"]["data.source"].names) == {
        s for s in SOURCES if ":" not in s}


def test_sweep_values_are_checked_before_any_run():
    from finetune.sweep import parse_grid
    config = finetune_rt_polarity.get_config()
    assert len(parse_grid(["lr=1e-4,3e-4"], config)) == 2
    with pytest.raises(UserError, match="optim.lr=-0.1"):
        parse_grid(["lr=1e-4,-0.1"], config)
    with pytest.raises(UserError, match="train.grad_accum=3"):  # together with batch_size 32
        parse_grid(["train.grad_accum=1,3"], config)
