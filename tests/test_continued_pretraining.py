"""Continued and task-adaptive pretraining: `python -m pretrain --init SRC` from a HuggingFace
folder transformers saved (first-step losses equal transformers', the export loads back), from
our own workdirs, reruns that resume and never re-initialise, a task's train texts as a corpus,
weighted mixtures of sources (shares, exact resume), and one-line errors that overwrite nothing."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
import transformers
from flax import nnx

from conftest import stop_at, tiny_config, tiny_flags
from data.corpora import load_documents, parse_sources
from data.pretraining import PretrainingData
from data.tasks import load_task
from data.wheels import DataError
from models import hf, hf_cli
from models.bert import BertForPreTraining
from models.tokenizer import Tokenizer
from training import init_source, run_record
from data.preparation import prepare
from pretrain.train import train_and_evaluate
from training.checkpoint_reader import read_params
from training.init_source import resolve_source, source_params
from training.metrics import read_metrics
from training.state import init_params
from test_pretrain_cli import one_line_error

TEXTS = ["The parser reads a module and returns its syntax tree.", "Hello, world!",
         "Exceptions propagate up the call stack until a handler catches them."]


def rows(workdir) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in read_metrics(workdir)]


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


def snapshot(workdir: Path) -> dict[str, bytes]:
    """Every file under workdir except metrics and TensorBoard events, by content."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file() and "tensorboard" not in p.parts and p.name != "metrics.jsonl"}


def hf_model(cls, vocab_size: int, seed: int = 0, **config):
    """A tiny BERT of `cls` made by transformers, with LayerNorms and biases moved off 1/0."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=96,
                                  max_position_embeddings=64, **config)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory, data_dir):
    """A transformers BertTokenizerFast over a WordPiece vocabulary learned on the tiny corpus."""
    folder = tmp_path_factory.mktemp("vocab")
    Tokenizer.train(load_documents("pydocs", data_dir), 512).save(folder)
    return folder


def hf_folder(folder: Path, vocab_dir: Path, cls=transformers.BertForPreTraining, **config) -> Path:
    """`cls` and its tokenizer as transformers' save_pretrained writes them."""
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(vocab_dir))
    model = hf_model(cls, len(tokenizer), **config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    """A tiny pretraining workdir of 3 steps, from random weights."""
    workdir = tmp_path_factory.mktemp("pretrained")
    train_and_evaluate(tiny_config(**{"data.data_dir": str(data_dir), "train.steps": 3}), workdir)
    return workdir


# ---------------------------------------------------------------------------------------------
# 1. From a HuggingFace BertForPreTraining: exact, and back out again
# ---------------------------------------------------------------------------------------------

def test_hf_source_first_step_losses_equal_transformers_and_export_loads_back(
        tmp_path, data_dir, vocab_dir, capsys):
    src = hf_folder(tmp_path / "src", vocab_dir)
    config = tiny_config(**{"data.data_dir": str(data_dir), "model.dropout": 0.0,
                            "model.attention_dropout": 0.0, "train.steps": 3})
    workdir = tmp_path / "run"
    train_and_evaluate(config, workdir, str(src))
    said = capsys.readouterr().out
    assert "weights from huggingface BertForPreTraining" in said and "every head loaded" in said
    assert config.data.tokenizer == ""  # the config stays as given; run.json has what was resolved
    config = run_record.view(config, json.loads((workdir / "run.json").read_text())["resolved"])
    assert config.data.tokenizer == str(src.resolve())  # the corpus was prepared with SRC's

    # The first batch as the loop saw it, through transformers' own model and losses.
    batch = PretrainingData(prepare(config.data, verbose=False)).batch(
        0, config.train.batch_size, seed=config.train.seed, max_predictions=config.data.max_predictions,
        mask_prob=config.data.mask_prob)
    labels = np.full(batch["input_ids"].shape, -100)
    for b, (positions, ids, weights) in enumerate(zip(batch["masked_positions"], batch["masked_ids"],
                                                      batch["masked_weights"])):
        for p, i, w in zip(positions, ids, weights):
            if w > 0:
                labels[b, p] = i
    model = transformers.BertForPreTraining.from_pretrained(src).eval()
    t = lambda x: torch.tensor(np.asarray(x, np.int64))
    with torch.no_grad():
        out = model(input_ids=t(batch["input_ids"]), token_type_ids=t(batch["token_type_ids"]),
                    attention_mask=t(batch["attention_mask"]), labels=t(labels),
                    next_sentence_label=t(batch["next_sentence_labels"]))
    ce = torch.nn.functional.cross_entropy
    theirs = {"mlm": float(ce(out.prediction_logits.flatten(0, 1), t(labels).flatten())),
              "nsp": float(ce(out.seq_relationship_logits, t(batch["next_sentence_labels"])))}
    assert abs(theirs["mlm"] + theirs["nsp"] - float(out.loss)) < 1e-5
    first = next(m for m in read_metrics(workdir) if m["step"] == 1)
    diffs = {k: abs(first[f"train/{k}_loss"] - v) for k, v in theirs.items()}
    print(f"\n[--init transformers BertForPreTraining] first-step losses ours vs transformers: "
          f"mlm {first['train/mlm_loss']:.6f} vs {theirs['mlm']:.6f}, nsp {first['train/nsp_loss']:.6f} "
          f"vs {theirs['nsp']:.6f}; max |diff| {max(diffs.values()):.2g}")
    assert max(diffs.values()) < 1e-5, diffs

    recorded = run_record.read(workdir)[0]
    assert recorded["init"]["kind"] == "huggingface" and recorded["init"]["step"] is None
    assert recorded["model"]["hidden_size"] == 64 and recorded["model"]["size"] == ""

    out_dir = tmp_path / "export"
    hf_cli.main(["export", "--checkpoint", str(workdir), "--out", str(out_dir)])
    back, info = transformers.BertForPreTraining.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert json.loads((out_dir / "config.json").read_text())["pretrax_init"] == {
        k: recorded["init"][k] for k in ("init", "kind", "path", "step")}
    ours_ids = transformers.AutoTokenizer.from_pretrained(out_dir)(TEXTS)["input_ids"]
    assert ours_ids == transformers.AutoTokenizer.from_pretrained(src)(TEXTS)["input_ids"]
    # Three steps moved the weights away from the source's.
    assert not torch.equal(back.bert.embeddings.word_embeddings.weight,
                           model.bert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("cls, fresh", [(transformers.BertForMaskedLM, "encoder/pooler, nsp"),
                                        (transformers.BertModel, "mlm_bias, mlm_norm, mlm_transform, nsp")])
def test_heads_the_source_lacks_start_fresh_and_are_named(cls, fresh, tmp_path, vocab_dir, capsys):
    src = hf_folder(tmp_path / "src", vocab_dir, cls)
    source = resolve_source(str(src))
    cfg = source.model_config()
    random = init_params(lambda rngs: BertForPreTraining(cfg, rngs), 0)
    params = source_params(source, random)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and f"it has no {fresh}: created fresh" in out[0], out
    imported = hf.import_params(src)[0]
    np.testing.assert_array_equal(params["encoder"]["layers"][1]["query"]["kernel"],
                                  imported["encoder"]["layers"][1]["query"]["kernel"])
    np.testing.assert_array_equal(params["nsp"]["kernel"], random["nsp"]["kernel"])
    if cls is transformers.BertForMaskedLM:
        np.testing.assert_array_equal(params["encoder"]["pooler"]["kernel"], random["encoder"]["pooler"]["kernel"])
        # Our MLM head on the imported weights gives transformers' logits.
        with nnx.use_eager_sharding(False):
            graphdef = nnx.graphdef(nnx.eval_shape(lambda: BertForPreTraining(cfg, nnx.Rngs(0))))
        model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
        rng = np.random.default_rng(0)
        ids, mask = rng.integers(5, cfg.vocab_size, (2, 20)), np.ones((2, 20), np.int64)
        mask[1, 12:] = 0
        mlm, _ = model(jnp.asarray(ids), jnp.zeros_like(jnp.asarray(ids)), jnp.asarray(mask))
        with torch.no_grad():
            theirs = transformers.BertForMaskedLM.from_pretrained(src).eval()(
                input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        assert np.abs(np.asarray(mlm) - theirs)[mask == 1].max() < 1e-4


# ---------------------------------------------------------------------------------------------
# 2. From our own workdir; reruns resume from their own checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # long: the default run stays under CI's 15 minutes
def test_continue_from_workdir_then_rerun_resumes_its_own_checkpoints(pretrained, tmp_path, data_dir,
                                                                       monkeypatch):
    flags = {"data.data_dir": str(data_dir), "train.steps": 6}
    full = tmp_path / "full"
    train_and_evaluate(tiny_config(**flags), full, str(pretrained))
    first_eval = next(m for m in read_metrics(full) if m["step"] == 0)
    src_eval = [m for m in read_metrics(pretrained) if "eval/loss" in m][-1]
    assert first_eval["eval/loss"] == pytest.approx(src_eval["eval/loss"], abs=1e-6)  # its weights
    init = run_record.read(full)[0]["init"]
    assert (init["kind"], init["step"], init["init"]) == ("checkpoint", 3, str(pretrained))

    # Stopped at step 4 (SIGTERM's path), then rerun: from its own checkpoint, never from SRC.
    stopped = tmp_path / "stopped"
    stop_at(monkeypatch, 4)
    train_and_evaluate(tiny_config(**flags), stopped, str(pretrained))
    monkeypatch.undo()
    reads = []
    monkeypatch.setattr(init_source, "load_params", lambda *a: reads.append(a))
    train_and_evaluate(tiny_config(**flags), stopped, str(pretrained))
    assert reads == [] and rows(stopped) == rows(full)


def test_pretraining_checkpoint_source_loads_every_head(pretrained, capsys):
    source = resolve_source(str(pretrained))
    cfg = source.model_config()
    random = init_params(lambda rngs: BertForPreTraining(cfg, rngs), 1)
    params = source_params(source, random)
    assert "every head loaded" in capsys.readouterr().out
    theirs = read_params(pretrained)[0]
    np.testing.assert_array_equal(params["nsp"]["kernel"], theirs["nsp"]["kernel"])
    np.testing.assert_array_equal(params["encoder"]["embed"]["word"]["embedding"],
                                  theirs["encoder"]["embed"]["word"]["embedding"])


# ---------------------------------------------------------------------------------------------
# 3. A task's train texts as a corpus
# ---------------------------------------------------------------------------------------------

def test_task_source_is_the_train_split_only(data_dir):
    task = load_task("rt_polarity", data_dir)
    docs = load_documents("task:rt_polarity", data_dir)
    assert docs == task.splits["train"].text_a
    held_out = set(task.splits["dev"].text_a) | set(task.splits["test"].text_a)
    assert held_out and not held_out & set(docs)


def test_task_source_of_a_glue_pair_task(tmp_path):
    with tfds.testing.mock_data(num_examples=10):
        task = load_task("glue/mrpc", tmp_path)
        docs = load_documents("task:glue/mrpc", tmp_path)
    train = task.splits["train"]
    assert docs == [f"{a}\n{b}" for a, b in zip(train.text_a, train.text_b)]
    assert not {t for s in ("dev", "test") for t in task.splits[s].text_a} & set(docs)


# ---------------------------------------------------------------------------------------------
# 4. Mixtures
# ---------------------------------------------------------------------------------------------

MIX = "pydocs:0.6,task:rt_polarity:0.4"


def test_mixture_shares_match_the_weights(data_dir, capsys):
    config = tiny_config(**{"data.data_dir": str(data_dir), "data.source": MIX})
    data = PretrainingData(prepare(config.data))
    out = capsys.readouterr().out
    assert "pydocs (share 0.600 of the mixture" in out and "task:rt_polarity (share 0.400" in out
    members = [{bytes(r) for r in data.source("train", i)} for i in range(2)]
    assert not members[0] & members[1]
    stream = data.records("train", seed=0)
    n = 4000
    drawn = [stream[k] for k in range(n)]
    share = sum(r in members[0] for r in drawn) / n
    print(f"\n[mixture {MIX}] observed share of pydocs over {n} examples: {share:.4f}")
    assert abs(share - 0.6) < 0.02
    assert sum(r in members[1] for r in drawn) == n - round(share * n)
    # Each source's stream is shuffled, not read in its on-disk order.
    from_pydocs = [r for r in drawn if r in members[0]]
    assert from_pydocs[:50] != [bytes(data.source("train", 0)[i]) for i in range(50)]
    report = json.loads((data.folder / "report.json").read_text())
    assert [(s["source"], s["share"]) for s in report["sources"]] == [("pydocs", 0.6), ("task:rt_polarity", 0.4)]


@pytest.mark.slow  # long: the default run stays under CI's 15 minutes
def test_mixed_run_stopped_and_resumed_replays_exactly(tmp_path, data_dir, monkeypatch):
    flags = {"data.data_dir": str(data_dir), "data.source": MIX, "train.steps": 6}
    train_and_evaluate(tiny_config(**flags), tmp_path / "full")
    stop_at(monkeypatch, 4)
    train_and_evaluate(tiny_config(**flags), tmp_path / "stopped")
    assert max(losses(tmp_path / "stopped")) == 4
    monkeypatch.undo()
    train_and_evaluate(tiny_config(**flags), tmp_path / "stopped")
    assert rows(tmp_path / "stopped") == rows(tmp_path / "full")  # every logged value, bitwise
    assert sorted(losses(tmp_path / "full")) == list(range(1, 7))


@pytest.mark.parametrize("spec, message", [
    ("news:abc,pydocs:1", "the weight 'abc' of 'news' is not a number"),
    ("news:-0.5,pydocs:1", "weights must be positive"),
    ("news,pydocs:1", "'news' has no weight"),
    ("news:1,news:2", "names a source twice"),
])
def test_bad_mixtures(spec, message):
    with pytest.raises(DataError, match=message):
        parse_sources(spec)
    assert parse_sources("tfds:wikipedia/20230601.en:train") == [("tfds:wikipedia/20230601.en:train", 1.0)]


# ---------------------------------------------------------------------------------------------
# 5. Bad input: one line, nothing overwritten
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_are_one_line_and_overwrite_nothing(capsys, tmp_path, pretrained, data_dir, vocab_dir):
    flags = tiny_flags(data_dir)
    runs = iter(range(100))

    def error(init, *extra, workdir=None):
        workdir = workdir or tmp_path / f"w{next(runs)}"
        argv = ["--workdir", str(workdir), *(["--init", str(init)] if init else []), *flags, *extra]
        capsys.readouterr()  # what earlier runs printed
        return one_line_error(capsys, argv)

    (tmp_path / "nothing" / "checkpoints").mkdir(parents=True)
    assert "holds no complete checkpoint" in error(tmp_path / "nothing")
    assert "no such folder" in error(tmp_path / "nope")
    classifier = hf_folder(tmp_path / "cls", vocab_dir, transformers.BertForSequenceClassification)
    err = error(classifier)
    assert "holds a BertForSequenceClassification" in err and "BertForMaskedLM" in err
    torch.manual_seed(0)
    roberta = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37))
    roberta.save_pretrained(tmp_path / "roberta")
    assert "model_type 'roberta' is not supported" in error(tmp_path / "roberta")
    assert "brings its own tokenizer" in error(pretrained, f"--config.data.tokenizer={vocab_dir}")
    assert "contradicts --init" in error(pretrained, "--config.model.size=mini")
    assert "unknown task 'sst9'" in error(None, "--config.data.source=task:sst9")
    assert "not a number" in error(None, "--config.data.source=pydocs:x,task:rt_polarity:1")
    assert "must be positive" in error(None, "--config.data.source=pydocs:-1,task:rt_polarity:1")

    # A workdir with checkpoints from another source (and one from random weights) is left as is.
    before = snapshot(pretrained)
    other = tmp_path / "other"
    train_and_evaluate(tiny_config(**{"data.data_dir": str(data_dir), "train.steps": 1}), other,
                       str(pretrained))
    before_other = snapshot(other)
    err = error(other, workdir=pretrained)
    assert "already has checkpoints of a run from random weights" in err
    err = error(classifier, workdir=other)  # not its source
    assert "was started with --init" in err
    assert "was started with --init" in error(None, workdir=other)
    assert snapshot(pretrained) == before and snapshot(other) == before_other
