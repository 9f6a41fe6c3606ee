"""Shared fixtures. Eight fake CPU devices, set before JAX first touches its backend."""

import jax

jax.config.update("jax_num_cpu_devices", 8)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import bert_tiny  # noqa: E402


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """The default config shrunk for tests: pydocs corpus (no download), short sequences."""
    c = bert_tiny.get_config()
    c.data.source = "pydocs"
    c.data.vocab_size = 512
    c.data.max_seq_len = 32
    c.data.max_predictions = 5
    c.data.dupe_factor = 1
    c.train.steps = 6
    c.train.batch_size = 16
    c.train.log_every = 1
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 3
    c.eval.every_steps = 1000
    c.eval.max_batches = 2
    c.perf.peak_tflops = 0.0
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One corpus cache for the whole session: corpora are built once."""
    return tmp_path_factory.mktemp("data")


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
