"""ModernBERT (Warner et al. 2024), as transformers' `ModernBertModel` / `ModernBertForMaskedLM`.

Pre-LayerNorm blocks without biases (LayerNorms without bias either, eps 1e-5); token embeddings
normed, no position or token-type tables: rotary embeddings (rotate-half form) in every attention
layer instead, base `global_rope_base` in the global layers (index % global_every == 0) and
`local_rope_base` in the others, which attend within a sliding window of `local_window` tokens
(half on each side); layer 0 has no attention norm (its input is the normed embeddings); fused
QKV; a GeGLU MLP (one projection to 2F: the input half, then the gate half; exact GELU); a final
norm. The MLM head is dense (no bias), GELU, LayerNorm, then the vocabulary tied to the token
embeddings with a bias, computed at the masked positions only (HF's `sparse_prediction`).

Shapes: B batch, T sequence (S for keys), D hidden, N heads, H head size, F GeGLU width, P masked
positions, V vocabulary. Parameters are float32; `dtype` is the compute dtype.

`attention_mask` (BT) is 0 on padding and numbers the documents of a packed row 1, 2, 3, ...:
attention never crosses a document and rotary positions restart at each one (as in BERT,
`models/bert.py`), so a packed row computes what its documents would, each alone in a row.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from infra.rules import COUNT, Bool, Choice, Real
from models import bert
from models.bert import segment_mask, segment_positions
from models.family import FamilySpec, register, sized_config
from models.layers import (ATTENTIONS, constrain, dense, dot_product_attention, dropout, fold,
                           layer_norm, make_grouped_stack, remat_name, rotary, run_stack,
                           sharded, tied_logits, truncated_normal, zeros)
from models.tokenizer import KINDS as TOKENIZER_KINDS

# name: (layers, hidden, heads, GeGLU width F); head size hidden/heads. base and large are the
# release's (149M and 395M parameters with its 50,368-token vocabulary).
SIZES = {
    "tiny": (4, 128, 2, 192),
    "mini": (7, 256, 4, 384),
    "base": (22, 768, 12, 1152),
    "large": (28, 1024, 16, 2624),
}


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
    vocab_size: int
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int          # F: the GeGLU width (Wi projects to 2F)
    max_position: int = 8192        # the longest row (rotary needs no table; a bound for data)
    local_window: int = 128         # tokens a local layer sees in all, half on each side
    global_every: int = 3           # layer i is global iff i % global_every == 0
    global_rope_base: float = 160_000.0
    local_rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0            # embedding and MLP dropout
    attention_dropout: float = 0.0  # attention probabilities and its output projection
    initializer_range: float = 0.02
    initializer_cutoff: float = 2.0  # truncated normal at this many standard deviations
    # The tokenizer's special ids, written into an exported config.json (transformers builds the
    # embedding's padding row from pad_token_id). Defaults: models/tokenizer.py's WordPiece.
    pad_token_id: int = 0
    cls_token_id: int = 2
    sep_token_id: int = 3
    dtype: str = "float32"
    remat: str = "none"         # a models/layers.py REMAT_POLICIES name (true/false: full/none)
    scan_layers: bool = False   # scan groups of (global_every) layers after layer 0
    attention: str = "auto"     # models/layers.py ATTENTIONS: auto | reference | xla | cudnn

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_name(self.remat))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.head_size % 2:
            raise ValueError(f"head size {self.head_size} is odd; rotary embeddings need an even one")
        if self.local_window <= 0 or self.local_window % 2:
            raise ValueError(f"local_window {self.local_window} must be a positive even number "
                             f"of tokens (half on each side)")
        if self.global_every < 1:
            raise ValueError(f"global_every must be at least 1, got {self.global_every}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; choose one of {', '.join(ATTENTIONS)}")
        if self.scan_layers and (self.num_layers - 1) % self.global_every:
            raise ValueError(f"scan_layers needs num_layers = 1 + a multiple of {self.global_every} "
                             f"(layer 0, then whole groups), got {self.num_layers}")

    @classmethod
    def of_size(cls, size: str, vocab_size: int, **overrides) -> "ModernBertConfig":
        if size not in SIZES:
            raise ValueError(f"unknown ModernBERT size {size!r}; choose one of {', '.join(SIZES)}")
        layers, hidden, heads, width = SIZES[size]
        sized = dict(vocab_size=vocab_size, num_layers=layers, hidden_size=hidden, num_heads=heads,
                     intermediate_size=width)
        return cls(**(sized | overrides))

    @classmethod
    def from_model_config(cls, model_cfg, *, allow=()) -> "ModernBertConfig":
        """From a run config's `model` group or a plain dict (models/family.py: sized_config)."""
        return sized_config(cls, model_cfg, "ModernBERT", allow)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    def is_global(self, layer: int) -> bool:
        return layer % self.global_every == 0

    @property
    def out_std(self) -> float:
        """The release's init of output projections: std / sqrt(2 * layers)."""
        return self.initializer_range / math.sqrt(2.0 * self.num_layers)


def _dense(cfg: ModernBertConfig, d_in, d_out, in_axes, out_axes, rngs, *, std, axis=-1,
           use_bias=False) -> nnx.LinearGeneral:
    return dense(d_in, d_out, in_axes, out_axes, dtype=cfg.dtype, rngs=rngs, axis=axis,
                 use_bias=use_bias, kernel_init=truncated_normal(std, cfg.initializer_cutoff))


def _norm(cfg: ModernBertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return layer_norm(cfg.hidden_size, cfg.norm_eps, rngs, use_bias=False)


class Layer(nnx.Module):
    """One pre-norm block: x += Attn(attn_norm(x)); x += GeGLU(mlp_norm(x)). Global or local
    (sliding window) attention by its index; layer 0 has no attn_norm."""

    def __init__(self, cfg: ModernBertConfig, index: int, rngs: nnx.Rngs):
        D, N, H, F = cfg.hidden_size, cfg.num_heads, cfg.head_size, cfg.intermediate_size
        self.attn_norm = _norm(cfg, rngs) if index > 0 else None
        # (D, 3, N, H): q, k, v stacked, HF's Wqkv (3D, D) transposed.
        self.qkv = _dense(cfg, D, (3, N, H), ["embed"], [None, "heads", "kv"], rngs,
                          std=cfg.initializer_range)
        self.attn_out = _dense(cfg, (N, H), D, ["heads", "kv"], ["embed"], rngs, std=cfg.out_std,
                               axis=(-2, -1))
        self.mlp_norm = _norm(cfg, rngs)
        # (D, 2, F): the input half, then the gate half, HF's Wi (2F, D) transposed.
        self.mlp_in = _dense(cfg, D, (2, F), ["embed"], [None, "mlp"], rngs, std=cfg.initializer_range)
        self.mlp_out = _dense(cfg, F, D, ["mlp"], ["embed"], rngs, std=cfg.out_std)
        is_global = cfg.is_global(index)
        self.rope_base = cfg.global_rope_base if is_global else cfg.local_rope_base
        self.half_window = None if is_global else cfg.local_window // 2
        self.cfg = cfg

    def __call__(self, x_BTD, mask_BTS, positions_BT, key):
        cfg = self.cfg
        h_BTD = x_BTD if self.attn_norm is None else self.attn_norm(x_BTD).astype(cfg.dtype)
        qkv_BT3NH = self.qkv(h_BTD)
        q_BTNH, k_BSNH, v_BSNH = (constrain(qkv_BT3NH[:, :, i], "batch", "seq", "heads", "kv")
                                  for i in range(3))
        q_BTNH = rotary(q_BTNH, positions_BT, self.rope_base)
        k_BSNH = rotary(k_BSNH, positions_BT, self.rope_base)
        ctx_BTNH = dot_product_attention(q_BTNH, k_BSNH, v_BSNH, dtype=cfg.dtype, mask_BTS=mask_BTS,
                                         dropout_rate=cfg.attention_dropout, key=fold(key, 0),
                                         implementation=cfg.attention, half_window=self.half_window)
        x_BTD = x_BTD + dropout(self.attn_out(ctx_BTNH), cfg.attention_dropout, fold(key, 1))

        in_BT2F = self.mlp_in(self.mlp_norm(x_BTD).astype(cfg.dtype))
        h_BTF = jax.nn.gelu(in_BT2F[:, :, 0], approximate=False) * in_BT2F[:, :, 1]
        h_BTF = dropout(constrain(h_BTF, "batch", "seq", "mlp"), cfg.dropout, fold(key, 2))
        return constrain(x_BTD + self.mlp_out(h_BTF), "batch", "seq", None)


class ModernBertEncoder(nnx.Module):
    """Token embeddings and their norm, the stack, the final norm (HF's `ModernBertModel`)."""

    def __init__(self, cfg: ModernBertConfig, rngs: nnx.Rngs):
        init = sharded(truncated_normal(cfg.initializer_range, cfg.initializer_cutoff), "vocab", "embed")
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, rngs=rngs)
        self.embed_norm = _norm(cfg, rngs)
        self.layers = make_grouped_stack(lambda i, rngs: Layer(cfg, i, rngs), cfg.num_layers, rngs,
                                         head=1, group=cfg.global_every, scan=cfg.scan_layers)
        self.final_norm = _norm(cfg, rngs)
        self.cfg = cfg

    def __call__(self, input_ids, attention_mask, *, key=None):
        """Hidden states BTD. `key=None` disables dropout."""
        cfg = self.cfg
        if input_ids.shape[1] > cfg.max_position:
            raise ValueError(f"rows of {input_ids.shape[1]} tokens are longer than the model's "
                             f"context of {cfg.max_position}; cut them or raise max_position")
        # Gather the fsdp-sharded table first, as BERT's embeddings do (models/bert.py).
        table_VD = constrain(self.embed.embedding[...], "vocab", None)
        x_BTD = self.embed_norm(jnp.take(table_VD, input_ids, axis=0)).astype(cfg.dtype)
        x_BTD = constrain(dropout(x_BTD, cfg.dropout, fold(key, 0)), "batch", "seq", None)
        x_BTD = run_stack(self.layers, x_BTD, segment_mask(attention_mask),
                          segment_positions(attention_mask), key=key, key_offset=1, remat=cfg.remat)
        return self.final_norm(x_BTD).astype(cfg.dtype)


class PredictionHead(nnx.Module):
    """dense (no bias), GELU, LayerNorm: HF's `ModernBertPredictionHead`, before the MLM decoder
    and before a classifier."""

    def __init__(self, cfg: ModernBertConfig, rngs: nnx.Rngs):
        self.dense = _dense(cfg, cfg.hidden_size, cfg.hidden_size, ["embed"], [None], rngs,
                            std=cfg.out_std)
        self.norm = _norm(cfg, rngs)
        self.cfg = cfg

    def __call__(self, x):
        return self.norm(jax.nn.gelu(self.dense(x), approximate=False)).astype(self.cfg.dtype)


class ModernBertForMaskedLM(nnx.Module):
    """The encoder, the prediction head and the decoder tied to the token embeddings."""

    def __init__(self, cfg: ModernBertConfig, rngs: nnx.Rngs):
        self.encoder = ModernBertEncoder(cfg, rngs)
        self.head = PredictionHead(cfg, rngs)
        self.decoder_bias = nnx.Param(zeros("vocab")(rngs.params(), (cfg.vocab_size,)))
        self.cfg = cfg

    def __call__(self, input_ids, attention_mask, masked_positions=None, *, key=None, hidden: bool = False):
        """float32 MLM logits: at `masked_positions` (BP) only (BPV), or without them at every
        position (BTV); with `hidden`, (logits, the last hidden states BTD) for pretraining
        distillation's cosine loss (pretrain/distill.py)."""
        last_BTD = x_BTD = self.encoder(input_ids, attention_mask, key=key)
        if masked_positions is not None:
            x_BTD = jnp.take_along_axis(x_BTD, masked_positions[..., None], axis=1)
        logits = tied_logits(self.head(x_BTD), self.encoder.embed.embedding[...], self.decoder_bias[...])
        logits = constrain(logits, "batch", None, "vocab")
        return (logits, last_BTD) if hidden else logits


def pool(x_BTD: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
    """BD: the first token's state ("cls") or the mean over real tokens ("mean"), as HF's
    `classifier_pooling`."""
    if pooling == "cls":
        return x_BTD[:, 0]
    if pooling == "mean":
        real_BT1 = (attention_mask > 0)[..., None].astype(x_BTD.dtype)
        return (x_BTD * real_BT1).sum(1) / real_BT1.sum(1)
    raise ValueError(f"unknown pooling {pooling!r}; choose cls or mean")


class ModernBertForSequenceClassification(nnx.Module):
    """HF's class: pooled hidden state -> prediction head -> dropout -> classifier (with bias)."""

    def __init__(self, cfg: ModernBertConfig, num_labels: int, rngs: nnx.Rngs, *,
                 pooling: str = "cls", classifier_dropout: float = 0.0):
        self.encoder = ModernBertEncoder(cfg, rngs)
        self.head = PredictionHead(cfg, rngs)
        self.classifier = _dense(cfg, cfg.hidden_size, num_labels, ["embed"], [None], rngs,
                                 std=cfg.hidden_size ** -0.5, use_bias=True)
        self.pooling, self.classifier_dropout = pooling, classifier_dropout

    def __call__(self, input_ids, attention_mask, *, key=None):
        """float32 logits BC."""
        x_BTD = self.encoder(input_ids, attention_mask, key=fold(key, 0))
        h_BD = self.head(pool(x_BTD, attention_mask, self.pooling))
        h_BD = dropout(h_BD, self.classifier_dropout, fold(key, 1))
        return self.classifier(h_BD).astype(jnp.float32)


class ModernBertForPositionClassification(nnx.Module):
    """HF's per-position classes: every position's hidden state -> prediction head -> dropout ->
    a layer with a bias. Named `token_classifier` it is ModernBertForTokenClassification, named
    `qa_outputs` with 2 outputs (start and end logits) ModernBertForQuestionAnswering; both are
    HF's `classifier`, and the name tells export which of them a parameter tree holds."""

    def __init__(self, cfg: ModernBertConfig, num_labels: int, rngs: nnx.Rngs, *,
                 classifier_dropout: float = 0.0, output: str = "token_classifier"):
        self.encoder = ModernBertEncoder(cfg, rngs)
        self.head = PredictionHead(cfg, rngs)
        setattr(self, output, _dense(cfg, cfg.hidden_size, num_labels, ["embed"], [None], rngs,
                                     std=cfg.hidden_size ** -0.5, use_bias=True))
        self.output, self.classifier_dropout = output, classifier_dropout

    def __call__(self, input_ids, attention_mask, *, key=None):
        """float32 logits BTC."""
        h_BTD = self.head(self.encoder(input_ids, attention_mask, key=fold(key, 0)))
        h_BTD = dropout(h_BTD, self.classifier_dropout, fold(key, 1))
        return getattr(self, self.output)(h_BTD).astype(jnp.float32)


# The family spec (models/family.py): its HuggingFace record today; its setups when they exist.
def size_name(cfg: ModernBertConfig) -> str:
    """The SIZES name of a shape, or "custom"."""
    shape = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size)
    return next((name for name, size in SIZES.items() if tuple(size) == shape), "custom")


def _checks() -> dict:
    """BERT's text fields (data, tokenizer, sequence budget), this model's own, packed MLM at two
    masking rates, and the recipe's optimizer fields (training/optim.py)."""
    own = {
        "model.size": Choice(tuple(SIZES), "ModernBERT size"),
        "model.local_window": COUNT,        # even: ModernBertConfig says so in one line
        "model.global_rope_base": Real(0, lo_open=True),
        "model.local_rope_base": Real(0, lo_open=True),
        "data.tokenizer_kind": Choice(TOKENIZER_KINDS, "tokenizer kind"),
        "optim.update_clip": Real(0),       # 0: off; StableAdamW-style per-tensor update clipping
        "optim.decoupled_decay": Bool(),
    }
    text = bert.SPEC.checks
    return {"pretrain": {**text["pretrain"], **own, "data.eval_mask_prob": Real(0, 1, lo_open=True)},
            "finetune": {**text["finetune"], **own}}


SPEC = register(FamilySpec(
    name="modernbert", config_class=ModernBertConfig, sizes=SIZES, size_of=size_name,
    # What a source fixes: the weights' shapes. A HuggingFace folder's attention pattern and rotary
    # bases come with it unless a flag sets them (the release's bases are 160,000 and 10,000); --init of one of our runs
    # takes the config's, so that a context extension (longer rows) sets a higher global base.
    shape_fields=("vocab_size", "num_layers", "hidden_size", "num_heads", "intermediate_size",
                  "norm_eps"),
    carried_fields=("local_window", "global_every", "global_rope_base", "local_rope_base"),
    pretrain="pretrain.modernbert", finetune="finetune.modernbert",
    hf="models.hf_modernbert:MODERNBERT", tokenizer="bpe", heads=("head", "decoder_bias"),
    pretrain_sources=("ModernBertForMaskedLM", "ModernBertModel"),
    checks=_checks(), cross_check=bert.SPEC.cross_check))
