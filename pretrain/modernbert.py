"""The ModernBERT family for pretraining: MLM alone, at 30% masking, on packed rows.

Rows are the `mlm_packed` ones (documents packed into full rows, numbered in attention_mask):
the model keeps attention inside each document and restarts its rotary positions there
(models/modernbert.py), so the packed row computes what its documents would alone, and no
compute goes to padding. Logits are computed at the masked positions only (HF's
`sparse_prediction`); data.max_predictions bounds them per row (30% of data.max_seq_len).
Evaluation masks data.eval_mask_prob (15%), so eval/mlm_accuracy compares with BERT's.

Corpus preparation, the workdir's tokenizer and the masked batches are BERT's
(pretrain/bert.py); the tokenizer is ModernBERT's byte-level BPE (data.tokenizer_kind="bpe").

`--init SRC` (a ModernBERT pretraining workdir, one of its checkpoints/<step> folders, or a
HuggingFace ModernBERT folder) starts from SRC's weights and tokenizer with a fresh optimizer and
step: the context-extension phase (longer rows, a higher global rotary base: neither changes a
weight's shape). The weights' shape comes from SRC (the spec's shape fields).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.modernbert import ModernBertConfig, ModernBertForMaskedLM
from pretrain.bert import _nll_and_correct, masked_batches, source_and_corpus
from infra.errors import UserError
from pretrain.setup import PretrainSetup
from training.init_source import source_params
from training.loop import Throughput
from training.perf import peak_flops_per_device
from training.step import Objective


def mlm_sums(logits_BPV, batch) -> dict:
    w_BP = batch["masked_weights"].astype(jnp.float32)
    nll, hit = _nll_and_correct(logits_BPV, batch["masked_ids"])
    return {"mlm_loss": jnp.sum(nll * w_BP), "mlm_correct": jnp.sum(hit * w_BP), "mlm_count": jnp.sum(w_BP)}


def pretraining_model(cfg: ModernBertConfig):
    return lambda rngs: ModernBertForMaskedLM(cfg, rngs)


def distill_outputs(model, batch, key):
    """Pretraining distillation's view of the model (pretrain/distill.py): MLM logits at the
    masked positions, the last hidden states, and the family's own sums of them."""
    logits_BPV, hidden_BTD = model(batch["input_ids"], batch["attention_mask"], batch["masked_positions"],
                                   key=key, hidden=True)
    return {"mlm": logits_BPV, "hidden": hidden_BTD, "sums": mlm_sums(logits_BPV, batch)}


def mlm_objective() -> Objective:
    """Summed MLM loss and hits at the masked positions; normalised by the global count."""

    def sums(model, batch, key):
        return mlm_sums(model(batch["input_ids"], batch["attention_mask"], batch["masked_positions"],
                              key=key), batch)

    def normalisers(batch):
        return {"mlm": jnp.maximum(jnp.sum(batch["masked_weights"]), 1.0)}

    def loss(sums, norm):
        return sums["mlm_loss"] / norm["mlm"]

    def summarize(sums, prefix):
        n = max(float(sums["mlm_count"]), 1.0)
        mlm_loss = float(sums["mlm_loss"]) / n
        return {f"{prefix}/mlm_loss": mlm_loss, f"{prefix}/mlm_accuracy": float(sums["mlm_correct"]) / n,
                f"{prefix}/loss": mlm_loss}

    return Objective(sums, normalisers, loss, summarize)


def train_flops(cfg: ModernBertConfig, batch_size: int, seq_len: int, max_predictions: int) -> float:
    """Matmul FLOPs of one training step (2 per multiply-add, backward = 2x forward, so 3x):
        B*T * L * 2*(4*D^2 + 3*D*F)       fused qkv, output projection; GeGLU (D -> 2F, F -> D)
      + B*T * 2*2*D * sum over layers of the keys a query needs: T (global), min(T, window) (local)
      + B*P * 2*(D^2 + D*V)               the head and the tied decoder at the masked positions
    The local layers' keys are what the window needs, not what a masked dense kernel computes, so
    MFU counts useful work. Not counted: norms, GELU, rotary, the embedding gather, the optimizer."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    tokens = batch_size * seq_len
    keys = sum(seq_len if cfg.is_global(i) else min(seq_len, cfg.local_window) for i in range(L))
    forward = tokens * (L * 2 * (4 * D * D + 3 * D * F) + 2 * 2 * D * keys)
    head = batch_size * max_predictions * 2 * (D * D + D * V)
    return 3.0 * (forward + head)


def model_config(config) -> ModernBertConfig:
    """config.model as the model's config; a bad value is one line. Checked before any data work
    (the vocabulary is not known yet then: 128 stands in for it)."""
    fields = config.model.to_dict()
    fields["vocab_size"] = fields["vocab_size"] or 128
    try:
        return ModernBertConfig.from_model_config(fields)
    except ValueError as e:
        raise UserError(f"config.model: {e}") from None


def setup(config, workdir, init: str | None = None, explicit=frozenset()) -> PretrainSetup:
    dc, tc = config.data, config.train
    if dc.objective != "mlm_packed":
        raise UserError(f"data.objective={dc.objective!r}: ModernBERT trains on packed rows "
                        "without a sentence task; use --config.data.objective=mlm_packed")
    model_config(config)  # before anything is written
    source, corpus, config, resolved = source_and_corpus(config, workdir, init, explicit)
    model_cfg = model_config(config)
    train, eval_batches = masked_batches(config, corpus)
    throughput = Throughput(
        items_per_step=tc.batch_size * dc.max_seq_len, unit="tokens",
        flops_per_step=train_flops(model_cfg, tc.batch_size, dc.max_seq_len, dc.max_predictions),
        peak_flops=peak_flops_per_device(config.perf.peak_tflops) * jax.device_count())
    return PretrainSetup(pretraining_model(model_cfg), mlm_objective(), train,
                         eval_batches, throughput,
                         initial_params=None if source is None else lambda fresh: source_params(source, fresh),
                         resolved=resolved, source=source)
