"""ModernBERT pretraining: packed MLM at two masking rates, its objective and FLOPs, a SIGTERM
and rerun that continues bitwise, and one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import cli_error, sigterm_when, with_fields
from configs import modernbert_tiny
from models.modernbert import ModernBertConfig, ModernBertForMaskedLM
from pretrain.__main__ import main as pretrain_main
from pretrain.modernbert import mlm_objective, setup, train_flops
from training import run_record
from training.checkpoint_reader import read_params
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
# modernbert_tiny shrunk: pydocs, a 512-token BPE, 32-token rows with a 16-token local window.
TINY_MB = {"data.source": "pydocs", "data.vocab_size": 512, "data.max_seq_len": 32,
           "data.max_predictions": 10, "data.dupe_factor": 1, "model.local_window": 16,
           "model.dropout": 0.1, "train.steps": 6, "train.batch_size": 16, "train.log_every": 4,
           "optim.warmup_steps": 2, "checkpoint.every_steps": 5, "eval.every_steps": 1000,
           "eval.max_batches": 2, "perf.peak_tflops": 0.0}


def tiny_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    return with_fields(modernbert_tiny.get_config(),
                       {**TINY_MB, "data.data_dir": str(data_dir), **overrides})


def overrides(data_dir, **fields) -> list[str]:
    values = {**TINY_MB, "data.data_dir": str(data_dir), **fields}
    return [f"--config.{k}={v}" for k, v in values.items()]


def flags(data_dir, **fields) -> list[str]:
    return ["--config", str(REPO / "configs" / "modernbert_tiny.py"), *overrides(data_dir, **fields)]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, data_dir):
    """README command 1 shrunk by field overrides alone: `python -m pretrain.prepare`, then
    `python -m pretrain`, with no --config or --workdir, in a fresh directory (returned)."""
    from pretrain.prepare import main as prepare_main
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        prepare_main(overrides(data_dir))
        pretrain_main(overrides(data_dir, **{"train.steps": 1}))
    return cwd


def test_the_default_run_is_modernbert_tiny_into_runs_modernbert_tiny(default_run):
    """modernbert_tiny's recipe, packed MLM with a byte-level BPE, written to
    runs/modernbert_tiny (the config's name) and nowhere else."""
    import json

    workdir = default_run / "runs" / "modernbert_tiny"
    config, record = run_record.read(workdir)
    assert record["family"] == "modernbert" and config["data"]["objective"] == "mlm_packed"
    assert config["data"]["mask_prob"] == 0.3 and config["optim"]["decay"] == "1-sqrt"
    assert json.loads((workdir / "tokenizer" / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    metrics = {k for m in read_metrics(workdir) for k in m}
    assert "eval/mlm_accuracy" in metrics and not any("nsp" in k for k in metrics)
    assert [p.name for p in default_run.iterdir()] == ["runs"]
    assert [p.name for p in (default_run / "runs").iterdir()] == ["modernbert_tiny"]


def test_train_masks_30_percent_and_eval_15_on_packed_rows(data_dir, tmp_path):
    config = tiny_config(data_dir)
    family = setup(config, tmp_path)
    try:
        train = next(family.train_batches)
    finally:
        family.train_batches.close()
    evaluation = next(iter(family.eval_batches()))
    assert (tmp_path / "tokenizer" / "tokenizer_config.json").exists()  # the BPE's
    for batch, rate in ((train, 0.3), (evaluation, 0.15)):
        real = (batch["attention_mask"] > 0).sum(1)
        want = np.clip(np.round(real * rate), 1, config.data.max_predictions)
        np.testing.assert_array_equal(batch["masked_weights"].sum(1), want)
        assert "next_sentence_labels" in batch  # the packed rows' constant, unused here


def test_objective_is_the_mean_cross_entropy_at_the_masked_positions():
    cfg = ModernBertConfig.of_size("tiny", 64, local_window=8)
    with nnx.use_eager_sharding(False):
        model = ModernBertForMaskedLM(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 64, (2, 12)).astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], np.int32)
    positions = np.array([[1, 6, 8], [2, 3, 0]], np.int32)
    labels = rng.integers(5, 64, (2, 3)).astype(np.int32)
    weights = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    batch = dict(input_ids=ids, attention_mask=segments, masked_positions=positions,
                 masked_ids=labels, masked_weights=weights)
    obj = mlm_objective()
    sums = obj.sums(model, batch, None)
    # Independently: every position's logits, then the ones at the masked positions, by numpy.
    every = np.asarray(model(jnp.asarray(ids), jnp.asarray(segments)))
    picked = np.stack([every[b, positions[b]] for b in range(2)])
    logp = picked - np.log(np.exp(picked - picked.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - picked.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    expected = (nll * weights).sum() / 5
    loss = obj.loss(sums, obj.normalisers(batch))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(sums["mlm_count"]) == 5.0
    summary = obj.summarize(jax.device_get(sums), "eval")
    assert set(summary) == {"eval/mlm_loss", "eval/mlm_accuracy", "eval/loss"}
    # negative control: the unused slot's logits would change the loss were it counted
    assert abs(float(optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(picked), jnp.asarray(labels)).mean()) - expected) > 1e-4


def test_flops_golden_by_hand():
    cfg = ModernBertConfig(vocab_size=100, num_layers=3, hidden_size=8, num_heads=2,
                           intermediate_size=12, local_window=4)
    # per token per layer 2*(4*64 + 3*96) = 1088; keys: T=16 (layer 0), 4, 4 -> 24
    forward = 2 * 16 * (3 * 1088 + 2 * 2 * 8 * 24)
    head = 2 * 5 * 2 * (64 + 800)
    assert train_flops(cfg, 2, 16, 5) == 3.0 * (forward + head)


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


@pytest.mark.slow  # whole runs: the default pytest stays under 15 minutes
def test_sigterm_inside_a_log_window_then_rerun_is_bitwise(tmp_path, data_dir):
    steps = dict(**{"train.steps": 14})

    def cli(workdir):
        return [sys.executable, "-m", "pretrain", "--workdir", str(workdir), *flags(data_dir, **steps)]
    full = subprocess.run(cli(tmp_path / "full"), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-2000:]
    workdir = tmp_path / "stopped"
    _, out = sigterm_when(cli(workdir), lambda: (workdir / "checkpoints" / "5").is_dir(), timeout=900)
    stopped_at = int(out.split("SIGTERM: stopped at step ")[1].split()[0].rstrip(".;,"))
    assert 5 <= stopped_at < 14, "the run finished before it was stopped; nothing was tested"
    again = subprocess.run(cli(workdir), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert losses(workdir) == losses(tmp_path / "full") and sorted(losses(workdir)) == [4, 8, 12, 14]
    for a, b in zip(jax.tree.leaves(read_params(tmp_path / "full")[0]),
                    jax.tree.leaves(read_params(workdir)[0])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("override, says", [
    ({"data.max_seq_len": 64, "model.max_position": 32}, "data.max_seq_len=64 exceeds model.max_position=32"),
    ({"model.local_window": 15}, "local_window 15 must be a positive even number"),
    ({"data.objective": "nsp"}, "use --config.data.objective=mlm_packed"),
    ({"data.tokenizer_kind": "unigram"}, "unknown tokenizer kind 'unigram'"),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, data_dir, override, says):
    workdir = tmp_path / "run"
    err = cli_error(capsys, pretrain_main, ["--workdir", str(workdir), *flags(data_dir, **override)])
    assert says in err, err
    assert not (workdir / "tokenizer").exists() and not (workdir / "config.json").exists()


@pytest.mark.slow  # whole runs: the default pytest stays under 15 minutes
def test_context_extension_starts_from_the_phase_1_weights(tmp_path, data_dir):
    phase1 = tmp_path / "phase1"
    pretrain_main(["--workdir", str(phase1), *flags(data_dir, **{"train.steps": 2})])
    phase2 = tmp_path / "phase2"
    # Longer rows and a higher global rotary base; lr 0 keeps the weights: they must be phase 1's.
    pretrain_main(["--workdir", str(phase2), "--init", str(phase1),
                   *flags(data_dir, **{"train.steps": 2, "data.max_seq_len": 64,
                                       "data.max_predictions": 20, "model.max_position": 64,
                                       "model.global_rope_base": 160000.0, "optim.lr": 0.0})])
    for a, b in zip(jax.tree.leaves(read_params(phase1)[0]), jax.tree.leaves(read_params(phase2)[0])):
        np.testing.assert_array_equal(a, b)
    config = run_record.read(phase2)[0]  # config.json as given, with what the run resolved
    assert config["init"]["kind"] == "checkpoint" and config["model"]["global_rope_base"] == 160000.0
    assert config["data"]["tokenizer"] == str((phase1 / "tokenizer").resolve())
    assert any("eval/mlm_accuracy" in m for m in read_metrics(phase2))


def test_init_from_another_family_is_one_line(capsys, tmp_path, data_dir, default_run):
    """bert_tiny (one --config away) from the default run's weights: refused, nothing written."""
    from conftest import tiny_flags
    capsys.readouterr()  # the default run's progress, where this test set it up
    workdir = tmp_path / "run"
    err = cli_error(capsys, pretrain_main, ["--workdir", str(workdir), "--init",
                                            str(default_run / "runs" / "modernbert_tiny"), *tiny_flags(data_dir)])
    assert "holds a modernbert model, but this config trains the bert family" in err, err
    assert not workdir.exists() or not any(p.name != "lease.json" for p in workdir.iterdir())


def hf_masked_lm(folder: Path, data_dir, **config):
    """A tiny ModernBertForMaskedLM and its BPE tokenizer as transformers' save_pretrained writes
    them: the vocabulary learned on pydocs, special ids from it, a 16-token window and the release's
    two rotary bases, norm scales and the decoder bias moved off 1 and 0."""
    import torch
    import transformers
    from data.corpora import load_documents
    from models.tokenizer import Tokenizer
    Tokenizer.train(load_documents("pydocs", data_dir), 512, kind="bpe").save(folder / "vocab")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "vocab")
    torch.manual_seed(0)
    model = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4, "local_attention": 16,
        "global_rope_theta": 160_000.0, "local_rope_theta": 10_000.0,
        "pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id, **config})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    return folder / "hf", model


@pytest.mark.slow  # a BPE, a corpus and a run: ~60 s idle, more under load
def test_init_from_a_transformers_folder_first_step_loss_equals_transformers(tmp_path, data_dir, capsys):
    """`python -m pretrain --init FOLDER` of a folder transformers saved: the first step's MLM
    loss is transformers' on the same batch, each document of a row run alone through
    ModernBertForMaskedLM; rows of 32 tokens against a 16-token window and two rotary bases, so
    both attention kinds count (packing itself: test_modernbert.py)."""
    import torch
    src, model = hf_masked_lm(tmp_path, data_dir)
    workdir = tmp_path / "run"
    pretrain_main(["--workdir", str(workdir), "--init", str(src), *flags(data_dir, **{
        "train.steps": 1, "train.log_every": 1, "model.dropout": 0.0, "checkpoint.every_steps": 1000})])
    assert "weights from huggingface ModernBertForMaskedLM" in capsys.readouterr().out
    recorded = run_record.read(workdir)[0]
    assert recorded["init"]["kind"] == "huggingface" and recorded["model"]["hidden_size"] == 64
    # The folder's rotary bases, not modernbert_tiny.py's phase-1 global base of 10,000.
    assert (recorded["model"]["global_rope_base"], recorded["model"]["local_rope_base"]) == (160000.0, 10000.0)

    # The first batch as the loop saw it (the corpus tokenised with SRC's tokenizer).
    from data.pretraining import PretrainingData
    from data.preparation import prepare
    dc, tc = ml_collections.ConfigDict(recorded["data"]), recorded["train"]
    assert dc.tokenizer == str(src.resolve())
    batch = PretrainingData(prepare(dc, verbose=False)).batch(
        0, tc["batch_size"], seed=tc["seed"], max_predictions=dc.max_predictions, mask_prob=dc.mask_prob)
    nll = []
    for row in range(len(batch["input_ids"])):
        ids, docs = batch["input_ids"][row], batch["attention_mask"][row]
        start = {d: int(np.argmax(docs == d)) for d in np.unique(docs[docs > 0])}
        for d, first in start.items():
            length = int((docs == d).sum())
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(ids[None, first:first + length].astype(np.int64))
                               ).logits[0].numpy().astype(np.float64)
            for p, label, w in zip(batch["masked_positions"][row], batch["masked_ids"][row],
                                   batch["masked_weights"][row]):
                if w > 0 and first <= p < first + length:
                    z = logits[p - first]
                    nll.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[label])
    assert len(nll) == int(batch["masked_weights"].sum())
    theirs = float(np.mean(nll))
    ours = next(m for m in read_metrics(workdir) if m["step"] == 1)["train/mlm_loss"]
    print(f"\n[--init transformers ModernBertForMaskedLM] first-step MLM loss ours {ours:.6f} vs "
          f"transformers {theirs:.6f}, |diff| {abs(ours - theirs):.2g}")
    assert abs(ours - theirs) < 1e-5


def test_init_from_a_transformers_folder_of_another_architecture_is_one_line(capsys, tmp_path, data_dir):
    import transformers
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    capsys.readouterr()  # transformers' progress bar
    workdir = tmp_path / "run"
    err = cli_error(capsys, pretrain_main, ["--workdir", str(workdir), "--init", str(tmp_path / "bert"),
                                            *flags(data_dir)])
    assert "holds a bert model, but this config trains the modernbert family" in err, err
    written = [p.name for p in workdir.rglob("*") if p.is_file()] if workdir.exists() else []
    assert written == [], written


# ---------------------------------------------------------------------------------------------
# Fine-tuning from a ModernBERT pretraining run (python -m finetune)
# ---------------------------------------------------------------------------------------------

def ft_flags(data_dir, **overrides) -> list[str]:
    from conftest import TINY_FT
    values = {**TINY_FT, "data.data_dir": str(data_dir), "train.log_every": 2, **overrides}
    return ["--config", str(REPO / "configs" / "finetune_modernbert_reuters_r8.py"),
            *[f"--config.{k}={v}" for k, v in values.items()]]


@pytest.mark.slow  # whole runs: the default pytest stays under 15 minutes
def test_finetune_starts_from_the_pretrained_encoder_and_head(tmp_path, data_dir):
    import json

    from finetune.__main__ import main as finetune_main
    pretrained = tmp_path / "pretrained"
    pretrain_main(["--workdir", str(pretrained), *flags(data_dir, **{"train.steps": 2})])
    out = tmp_path / "ft"
    finetune_main(["--workdir", str(out), "--init", str(pretrained),
                   *ft_flags(data_dir, **{"train.steps": 2, "optim.lr": 0.0,
                                          "model.pooling": "mean"})])
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["test"]["accuracy"] <= 1.0 and results["source"]["kind"] == "checkpoint"
    assert results["encoder"]["local_window"] == 16  # the source's shape, not the config's 128
    # lr 0: the encoder and head are the pretrained ones, bitwise; the classifier is new.
    source, tuned = read_params(pretrained)[0], read_params(out)[0]
    for part in ("encoder", "head"):
        for a, b in zip(jax.tree.leaves(source[part]), jax.tree.leaves(tuned[part])):
            np.testing.assert_array_equal(a, b)
    assert tuned["classifier"]["kernel"].shape == (128, 8)
    # the run records the source's encoder, so an export of this run builds that one
    model = run_record.read(out)[0]["model"]
    assert model["local_window"] == 16 and model["num_layers"] == 4 and model["pooling"] == "mean"


def test_bert_finetuning_from_the_default_run_is_one_line(capsys, tmp_path, data_dir, default_run):
    """A BERT fine-tuning config (the README's examples) from the default ModernBERT run."""
    from conftest import TINY_FT
    from finetune.__main__ import main as finetune_main
    flags = [f"--config.{k}={v}" for k, v in {**TINY_FT, "data.data_dir": str(data_dir)}.items()]
    capsys.readouterr()
    err = cli_error(capsys, finetune_main, [
        "--config", str(REPO / "configs" / "finetune_rt_polarity.py"), "--workdir", str(tmp_path / "ft"),
        "--init", str(default_run / "runs" / "modernbert_tiny"), *flags])
    assert "holds a modernbert model, but this config trains the bert family" in err, err


@pytest.mark.slow  # whole runs: the default pytest stays under 15 minutes
def test_finetuned_classifier_exports_to_transformers_with_our_logits(tmp_path, data_dir):
    import json

    import torch
    import transformers

    from data.tasks import Split, encode
    from finetune.__main__ import main as finetune_main
    from models import hf_cli
    from models.modernbert import ModernBertForSequenceClassification
    from models.tokenizer import Tokenizer
    from training.state import abstract_model
    pretrained, out = tmp_path / "pretrained", tmp_path / "ft"
    pretrain_main(["--workdir", str(pretrained), *flags(data_dir, **{"train.steps": 2})])
    finetune_main(["--workdir", str(out), "--init", str(pretrained),
                   *ft_flags(data_dir, **{"train.steps": 2, "optim.lr": 1e-3})])
    hf_cli.main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "hf")])
    results = json.loads((out / "results.json").read_text())
    cfg = ModernBertConfig(**results["encoder"])
    model = nnx.merge(nnx.graphdef(abstract_model(
        lambda r: ModernBertForSequenceClassification(cfg, 8, r))), read_params(out)[0])
    texts = ["Oil prices rose sharply today " * 8, "Net profit was up.", "Shr 10 cts"]  # longer than the window
    batch = encode(Split(texts, None, np.zeros(3), np.arange(3)), Tokenizer.load(out / "tokenizer"), 32)
    ours = np.asarray(model(batch["input_ids"], batch["attention_mask"]))
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = theirs(input_ids=torch.tensor(batch["input_ids"]).long(),
                        attention_mask=torch.tensor(batch["attention_mask"]).long()).logits.numpy()
    np.testing.assert_allclose(logits, ours, atol=1e-5)
    # the exported BPE tokenizer gives the ids we trained with
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = batch["input_ids"][1][batch["attention_mask"][1] > 0].tolist()
    assert tokenizer(texts[1])["input_ids"] == ids


@pytest.mark.slow  # two runs
def test_distilled_student_starts_from_every_other_teacher_layer(tmp_path, data_dir):
    """Pretraining distillation (pretrain/distill.py) takes the ModernBERT family: a 2-layer student
    of a 4-layer teacher, its layers the teacher's 0 and 2 (lr 0 keeps them as they started),
    trained on the soft targets and the hidden-state cosine as well as its own MLM loss."""
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    pretrain_main(["--workdir", str(teacher), *flags(data_dir, **{"train.steps": 2})])
    pretrain_main(["--workdir", str(student), *flags(data_dir, **{
        "train.steps": 2, "train.log_every": 2, "optim.lr": 0.0, "distill.teacher": str(teacher)})])
    assert json.loads((student / "run.json").read_text())["resolved"]["model"]["num_layers"] == 2
    ours, theirs = read_params(student)[0]["encoder"], read_params(teacher)[0]["encoder"]
    assert sorted(ours["layers"]) == [0, 1] and len(theirs["layers"]) == 4
    for mine, their in ((0, 0), (1, 2)):
        for a, b in zip(jax.tree.leaves(ours["layers"][mine]), jax.tree.leaves(theirs["layers"][their])):
            np.testing.assert_array_equal(a, b)
    row = next(m for m in read_metrics(student) if "train/soft" in m)
    assert row["train/soft"] > 0 and row["train/cos"] > 0
