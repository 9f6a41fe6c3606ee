"""Shared fixtures. Eight fake CPU devices, set before JAX first touches its backend."""

import contextlib
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import bert_tiny  # noqa: E402


# bert_tiny shrunk for tests (the loop, checkpoints, storage and processes seen through BERT's NSP
# and WordPiece): pydocs corpus (no download), short sequences, tiny batches; dropout on, so resume
# and mesh-equality tests cover the dropout random stream too.
BERT_TINY = str(Path(__file__).resolve().parents[1] / "configs" / "bert_tiny.py")
TINY = {
    "model.dropout": 0.1, "model.attention_dropout": 0.1, "data.source": "pydocs", "data.vocab_size": 512, "data.max_seq_len": 32,
    "data.max_predictions": 5, "data.dupe_factor": 1, "train.steps": 6, "train.batch_size": 16,
    "train.log_every": 1, "optim.warmup_steps": 2, "checkpoint.every_steps": 3,
    "eval.every_steps": 1000, "eval.max_batches": 2, "perf.peak_tflops": 0.0,
}

# Fine-tuning shrunk for tests: 64 train examples, 32 dev and test, 32 tokens, 6 steps.
TINY_FT = {"data.max_seq_len": 32, "data.max_train_examples": 64, "data.max_eval_examples": 32,
           "train.steps": 6, "train.batch_size": 16, "train.log_every": 1, "eval.every_steps": 3,
           "optim.lr": 1e-3}


# The per-test limit of a slow test (the default run's is `timeout` in pyproject.toml).
SLOW_TIMEOUT = 900


def pytest_collection_modifyitems(items):
    """Slow tests get SLOW_TIMEOUT unless they name a limit of their own."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


def unmasked(batch):
    """The input ids before masking: the original ids put back at the masked positions."""
    ids = batch["input_ids"].copy()
    rows, slots = np.nonzero(batch["masked_weights"])
    ids[rows, batch["masked_positions"][rows, slots]] = batch["masked_ids"][rows, slots]
    return ids


def with_fields(c: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
    """`c` with dotted fields set ({"train.steps": 3}); returns `c`."""
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    return with_fields(bert_tiny.get_config(), {**TINY, **overrides})


def tiny_flags(data_dir, **overrides) -> list[str]:
    """`--config` bert_tiny (named: the trainers' default is modernbert_tiny) and TINY as
    `--config.KEY=VALUE` flags; override keys use `__` for dots (train__steps=3)."""
    values = {**TINY, "data.data_dir": str(data_dir),
              **{k.replace("__", "."): v for k, v in overrides.items()}}
    return ["--config", BERT_TINY, *[f"--config.{k}={v}" for k, v in values.items()]]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One corpus cache for the whole session: corpora are built once."""
    return tmp_path_factory.mktemp("data")


def stop_at(monkeypatch, step: int):
    """What SIGTERM does at `step`: StopRequest says stop there (the signal path has CLI tests)."""
    from training import loop

    def should_stop(self, s):
        self.reason = "SIGTERM" if s >= step else None
        return s >= step
    monkeypatch.setattr(loop.StopRequest, "should_stop", should_stop)


def random_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int, preds: int) -> dict:
    """A structurally valid pretraining batch of random ids, with padding in some rows."""
    lengths = rng.integers(seq // 2, seq + 1, size=batch)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(5, vocab, size=(batch, seq)).astype(np.int32) * mask
    types = ((np.arange(seq)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
    positions = np.sort(np.stack([rng.choice(l, preds, replace=False) for l in lengths]), axis=1)
    weights = (rng.random((batch, preds)) < 0.8).astype(np.float32)
    return {
        "input_ids": ids, "token_type_ids": types, "attention_mask": mask,
        "masked_positions": positions.astype(np.int32),
        "masked_ids": rng.integers(5, vocab, size=(batch, preds)).astype(np.int32),
        "masked_weights": weights,
        "next_sentence_labels": rng.integers(0, 2, size=batch).astype(np.int32),
    }


def cli_error(capsys, main, argv) -> str:
    """The one line a CLI `main` prints for bad input (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A real GCS-compatible server (fake-gcs-server) on a free loopback port with the bucket
    `gcs.BUCKET`, every client of this process and its children pointed at it; its URL."""
    import os

    from gcs import fake_gcs
    os.environ["PRETRAX_MIRROR_DIR"] = str(tmp_path_factory.mktemp("mirror"))
    with fake_gcs() as url:
        yield url
    os.environ.pop("PRETRAX_MIRROR_DIR")


def sigterm_when(command, ready, timeout=300) -> tuple[int, str]:
    """Run a CLI, send it SIGTERM once `ready()` holds (or it has ended by itself); its exit
    status and stdout. (The repository root is the working directory.)"""
    import signal
    import subprocess
    import time
    from pathlib import Path

    proc = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return proc.returncode, out


@contextlib.contextmanager
def mounted_tmpfs(folder, options: str):
    """A tmpfs mounted on `folder` for the block (`options`: e.g. "size=512k" or "ro"), where the
    machine lets the test mount one (root, mount permitted); the test is skipped elsewhere."""
    import os
    import shutil
    import subprocess

    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and the mount command")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def ft_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    """finetune_rt_polarity's config at TINY_FT's size; overrides as fields (train__steps=3)."""
    from configs import finetune_rt_polarity
    return with_fields(finetune_rt_polarity.get_config(), {
        **TINY_FT, "data.data_dir": str(data_dir), **{k.replace("__", "."): v for k, v in overrides.items()}})


def perturbed_params(model, seed: int) -> dict:
    """A model's parameters with norm scales and biases moved off 1 and 0 (parity tests)."""
    import jax
    import numpy as np
    from flax import nnx
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        name = str(path[-1].key)
        x = np.asarray(x)
        if name == "scale":
            return x + rng.normal(0, 0.2, x.shape).astype(np.float32)
        if name in ("bias", "decoder_bias"):
            return rng.normal(0, 0.3, x.shape).astype(np.float32)
        return x
    return jax.tree_util.tree_map_with_path(perturb, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
