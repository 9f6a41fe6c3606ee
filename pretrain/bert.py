"""The BERT family for pretraining: MLM + NSP (or SOP, or packed MLM alone) on prepared text.

`setup(config, workdir, init, explicit)` prepares the corpus once (pretrain/prepare.py), saves
the tokenizer in the workdir, rounds the vocabulary for sharding, and binds the masking options
into the data iterator. Losses are sums and counts (training/step.py), so microbatching and
evaluation normalise by the global number of predictions.

With `--init SRC` (continued pretraining) the model's shape and tokenizer are SRC's and the corpus
is prepared with that tokenizer; a fresh start takes SRC's weights (a HuggingFace BertForMaskedLM
has no pooler or NSP head, a BertModel no heads: those start random, said in one line).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from data.pipeline import BatchWarmup
from data.pretraining import PretrainingData
from models.bert import BertConfig, BertForPreTraining
from pretrain.setup import PretrainSetup
from data.preparation import prepare
from training import run_record
from training.errors import UserError
from training.init_source import pretrain_source, source_params
from training.loop import Throughput
from training.perf import peak_flops_per_device
from training.step import Objective


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------

def _nll_and_correct(logits, labels):
    """Cross entropy and hits, where a hit is the label's logit being the largest (a tie, which
    argmax would break by index, counts): the max is the one the softmax takes anyway, where an
    argmax is one more pass over the vocabulary (45 ms of BERT-mini's 1.2 s step on CPU)."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    correct = (label_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return nll, correct


def mlm_nsp_sums(mlm_logits_BPV, nsp_logits_BC, batch) -> dict[str, jax.Array]:
    """Summed losses and hit counts; `masked_weights` (BP) is 0 on unused prediction slots."""
    w_BP = batch["masked_weights"].astype(jnp.float32)
    mlm_nll, mlm_hit = _nll_and_correct(mlm_logits_BPV, batch["masked_ids"])
    nsp_nll, nsp_hit = _nll_and_correct(nsp_logits_BC, batch["next_sentence_labels"])
    return {
        "mlm_loss": jnp.sum(mlm_nll * w_BP), "mlm_correct": jnp.sum(mlm_hit * w_BP),
        "mlm_count": jnp.sum(w_BP),
        "nsp_loss": jnp.sum(nsp_nll), "nsp_correct": jnp.sum(nsp_hit),
        "nsp_count": jnp.asarray(nsp_nll.shape[0], jnp.float32),
    }


def objective(nsp_weight: float = 1.0) -> Objective:
    """MLM loss plus nsp_weight x NSP loss (0 for MLM-only objectives such as packed rows)."""

    def sums(model, batch, key):
        mlm_BPV, nsp_BC = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                batch["masked_positions"], key=key)
        return mlm_nsp_sums(mlm_BPV, nsp_BC, batch)

    def normalisers(batch):
        return {"mlm": jnp.maximum(jnp.sum(batch["masked_weights"]), 1.0),
                "nsp": jnp.asarray(batch["next_sentence_labels"].shape[0], jnp.float32)}

    def loss(sums, norm):
        return sums["mlm_loss"] / norm["mlm"] + nsp_weight * sums["nsp_loss"] / norm["nsp"]

    def summarize(sums, prefix):
        mlm_n, nsp_n = max(float(sums["mlm_count"]), 1.0), max(float(sums["nsp_count"]), 1.0)
        out = {
            f"{prefix}/mlm_loss": float(sums["mlm_loss"]) / mlm_n,
            f"{prefix}/mlm_accuracy": float(sums["mlm_correct"]) / mlm_n,
            f"{prefix}/nsp_loss": float(sums["nsp_loss"]) / nsp_n,
            f"{prefix}/nsp_accuracy": float(sums["nsp_correct"]) / nsp_n,
        }
        out[f"{prefix}/loss"] = out[f"{prefix}/mlm_loss"] + nsp_weight * out[f"{prefix}/nsp_loss"]
        return out

    return Objective(sums, normalisers, loss, summarize)


def pretraining_model(cfg: BertConfig):
    return lambda rngs: BertForPreTraining(cfg, rngs)


def distill_outputs(model, batch, key):
    """Pretraining distillation's view of the model (pretrain/distill.py): MLM logits at the
    masked positions, the last hidden states, and the family's own sums of them."""
    mlm_BPV, nsp_BC, hidden_BTD = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                        batch["masked_positions"], key=key, hidden=True)
    return {"mlm": mlm_BPV, "hidden": hidden_BTD, "sums": mlm_nsp_sums(mlm_BPV, nsp_BC, batch)}


def train_flops(cfg: BertConfig, batch_size: int, seq_len: int, max_predictions: int) -> float:
    """Matmul FLOPs of one training step: 2 per multiply-add, backward = 2x forward, so 3x
        B*T * L * (2*(4*D^2 + 2*D*F) + 4*T*D)   q, k, v, out projections, MLP; scores and mix
      + B*P * 2*(D^2 + D*V)                       MLM transform and the tied vocabulary projection
    with P = `max_predictions` (the positions that get vocabulary logits; T for a model that
    scores every position). The tied table's gradient is the projection's weight gradient,
    inside the 3x. Not counted: softmax, LayerNorm, GELU, the embedding gathers and their
    scatter-add gradients, the pooler and NSP head (under 0.1% at BERT-base), the optimizer."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    tokens = batch_size * seq_len
    per_token = L * (4 * D * D + 2 * D * F) * 2           # qkv+out, mlp
    attention = L * 2 * 2 * seq_len * D                     # scores + weighted sum, per token
    head = batch_size * max_predictions * (D * D + D * V) * 2
    return 3.0 * (tokens * (per_token + attention) + head)


# ---------------------------------------------------------------------------------------------
# The setup
# ---------------------------------------------------------------------------------------------

def prepared_corpus(config, workdir, *, set_vocab: bool) -> tuple[PretrainingData, dict]:
    """(the corpus prepared once (each process a share of the shards), then reused, its tokenizer
    saved in the workdir; with `set_vocab` what it resolves: model.vocab_size from it)."""
    corpus = PretrainingData(prepare(config.data, process_index=jax.process_index(),
                                     process_count=jax.process_count()))
    if jax.process_index() == 0:
        corpus.tokenizer.save(workdir / "tokenizer")
    # Round the vocabulary up to a multiple of 128: it shards over `tensor` and tiles well.
    vocab = -(-corpus.tokenizer.vocab_size // 128) * 128
    return corpus, {"model": {"vocab_size": vocab}} if set_vocab else {}


def source_and_corpus(config, workdir, init, explicit):
    """(the --init source, the corpus, the config as resolved, what was resolved): the text
    families' start, the source first (nothing is written before it is checked)."""
    source, resolved = pretrain_source(config, workdir, init, explicit)
    corpus, vocab = prepared_corpus(run_record.view(config, resolved), workdir, set_vocab=source is None)
    resolved = run_record.merged(resolved, vocab)
    return source, corpus, run_record.view(config, resolved), resolved


def masked_batches(config, corpus: PretrainingData):
    """This process's train iterator and the eval pass, masked at data.mask_prob, evaluation at
    data.eval_mask_prob where the config has it (ModernBERT: trains at 30%, evaluates at 15%)."""
    dc, tc = config.data, config.train
    masking = dict(seed=tc.seed, max_predictions=dc.max_predictions, mask_prob=dc.mask_prob,
                   whole_word=dc.whole_word, process_index=jax.process_index(),
                   process_count=jax.process_count())
    train = corpus.train_iterator(tc.batch_size, workers=dc.workers, prefetch=dc.prefetch,
                                  warmup=BatchWarmup.of(tc), **masking)
    eval_masking = dict(masking, mask_prob=dc.get("eval_mask_prob", dc.mask_prob))
    eval_batches = lambda: corpus.eval_batches(tc.batch_size, config.eval.max_batches, **eval_masking)
    return train, eval_batches


def setup(config, workdir, init: str | None = None, explicit=frozenset()) -> PretrainSetup:
    source, corpus, config, resolved = source_and_corpus(config, workdir, init, explicit)
    dc, tc = config.data, config.train
    try:
        model_cfg = BertConfig.from_model_config(config.model)
    except ValueError as e:
        raise UserError(f"config.model: {e}") from None
    train, eval_batches = masked_batches(config, corpus)
    nsp_weight = 0.0 if dc.objective == "mlm_packed" else 1.0  # packed rows have no sentence pair
    throughput = Throughput(
        items_per_step=tc.batch_size * dc.max_seq_len, unit="tokens",
        flops_per_step=train_flops(model_cfg, tc.batch_size, dc.max_seq_len, dc.max_predictions),
        peak_flops=peak_flops_per_device(config.perf.peak_tflops) * jax.device_count())
    return PretrainSetup(pretraining_model(model_cfg), objective(nsp_weight), train,
                         eval_batches, throughput,
                         initial_params=None if source is None else lambda fresh: source_params(source, fresh),
                         resolved=resolved, source=source)
