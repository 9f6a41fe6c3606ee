"""MLM and NSP losses and metrics, as sums and counts.

Returning sums (not means) lets gradient accumulation and evaluation normalise by the *global*
number of predictions, so microbatching leaves the update unchanged.
"""

import jax
import jax.numpy as jnp


SUM_KEYS = ("mlm_loss", "mlm_correct", "mlm_count", "nsp_loss", "nsp_correct", "nsp_count")


def _nll_and_correct(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
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


def normalisers(batch) -> dict[str, jax.Array]:
    """Global prediction counts of a batch, known before the forward pass."""
    return {"mlm": jnp.maximum(jnp.sum(batch["masked_weights"]), 1.0),
            "nsp": jnp.asarray(batch["next_sentence_labels"].shape[0], jnp.float32)}


def total_loss(sums, norm, nsp_weight: float = 1.0) -> jax.Array:
    """MLM loss plus nsp_weight x NSP loss (0 for MLM-only objectives such as packed rows)."""
    return sums["mlm_loss"] / norm["mlm"] + nsp_weight * sums["nsp_loss"] / norm["nsp"]


def summarize(sums: dict, prefix: str, nsp_weight: float = 1.0) -> dict[str, float]:
    """Sums (possibly added over many batches) -> mean losses and accuracies."""
    mlm_n, nsp_n = max(float(sums["mlm_count"]), 1.0), max(float(sums["nsp_count"]), 1.0)
    out = {
        f"{prefix}/mlm_loss": float(sums["mlm_loss"]) / mlm_n,
        f"{prefix}/mlm_accuracy": float(sums["mlm_correct"]) / mlm_n,
        f"{prefix}/nsp_loss": float(sums["nsp_loss"]) / nsp_n,
        f"{prefix}/nsp_accuracy": float(sums["nsp_correct"]) / nsp_n,
    }
    out[f"{prefix}/loss"] = out[f"{prefix}/mlm_loss"] + nsp_weight * out[f"{prefix}/nsp_loss"]
    return out


def bert_train_flops(cfg, batch_size: int, seq_len: int, max_predictions: int) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward)."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    tokens = batch_size * seq_len
    per_token = L * (4 * D * D + 2 * D * F) * 2           # qkv+out, mlp
    attention = L * 2 * 2 * seq_len * D                     # scores + weighted sum, per token
    head = batch_size * max_predictions * (D * D + D * V) * 2
    return 3.0 * (tokens * (per_token + attention) + head)
