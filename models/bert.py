"""BERT as published (Devlin et al. 2019): post-LayerNorm blocks, exact GELU, learned positions.

Shapes: B batch, T sequence (S for keys), D hidden, N heads, H head size, F feed-forward, P masked
positions, V vocabulary. Parameters are float32; `dtype` is the compute dtype (LayerNorm
statistics and the attention softmax stay float32). Every weight carries logical axis names;
`training/mesh.py` maps them onto the mesh.

`attention_mask` (BT) is 0 on padding and numbers the documents of a packed row 1, 2, 3, ...
(an unpacked row is all 1s on its tokens). A token attends only to the real tokens of its own
document (`segment_mask`), and positions restart at 0 with each document (`segment_positions`),
so a packed row computes what its documents would, each alone in a row.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from infra.rules import (COUNT, DROPOUT, NONNEG, OBJECTIVES, POOLINGS, PROB, SEED, SQUAD_TASKS,
                         TASKS, TEXT_TASK_PREFIXES, Bool, Choice, Int, Real, Text)
from models.family import FamilySpec, register, sized_config
from models.layers import (ATTENTIONS, constrain, dense, dot_product_attention, dropout, fold,
                           layer_norm, make_stack, normal, remat_name, run_stack, tied_logits, zeros)

# name: (layers, hidden, heads); feed-forward is 4x hidden, head size hidden/heads.
SIZES = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    dtype: str = "float32"
    remat: str = "none"         # a models/layers.py REMAT_POLICIES name (true/false: full/none)
    scan_layers: bool = False   # one scanned layer over stacked weights (compiles in O(1) layers)
    attention: str = "auto"     # models/layers.py ATTENTIONS: auto | reference | xla | cudnn

    def __post_init__(self):  # the attention reshapes D into N x H
        object.__setattr__(self, "remat", remat_name(self.remat))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; choose one of {', '.join(ATTENTIONS)}")

    @classmethod
    def of_size(cls, size: str, vocab_size: int, **overrides) -> "BertConfig":
        if size not in SIZES:
            raise ValueError(f"unknown BERT size {size!r}; choose one of {', '.join(SIZES)}")
        layers, hidden, heads = SIZES[size]
        base = cls(vocab_size=vocab_size, num_layers=layers, hidden_size=hidden,
                   num_heads=heads, intermediate_size=4 * hidden)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_model_config(cls, model_cfg, *, allow=()) -> "BertConfig":
        """The one way to build a BertConfig from a run config's `model` group or a plain dict
        (models/family.py: sized_config)."""
        return sized_config(cls, model_cfg, "BERT", allow)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


def segment_mask(segments_BT: jax.Array) -> jax.Array:
    """BTS bool: query t sees key s iff s is a real token of t's document (`attention_mask`
    numbers documents from 1, 0 is padding). A padding query sees every real key, as in BERT,
    so its (unused) value stays finite; an unpacked row gets BERT's padding mask."""
    q_BT1, k_B1S = segments_BT[:, :, None], segments_BT[:, None, :]
    return (k_B1S > 0) & ((k_B1S == q_BT1) | (q_BT1 == 0))


def segment_positions(segments_BT: jax.Array) -> jax.Array:
    """BT position ids: 0 at the first token of every document, counting up within it; padding
    keeps its index in the row. An unpacked row gets exactly arange(T) (HuggingFace's ids)."""
    t_T = jnp.arange(segments_BT.shape[1])
    previous_BT = jnp.pad(segments_BT[:, :-1], ((0, 0), (1, 0)))
    starts_BT = (segments_BT > 0) & (segments_BT != previous_BT)
    last_start_BT = jax.lax.cummax(jnp.where(starts_BT, t_T, 0), axis=1)
    return jnp.where(segments_BT > 0, t_T - last_start_BT, t_T)


def _dense(cfg: BertConfig, d_in, d_out, in_axes, out_axes, rngs, axis=-1) -> nnx.LinearGeneral:
    return dense(d_in, d_out, in_axes, out_axes, dtype=cfg.dtype, rngs=rngs, axis=axis,
                 kernel_init=nnx.initializers.normal(cfg.initializer_range))


class Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        init = lambda *axes: normal(cfg.initializer_range, *axes)
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init("vocab", "embed"), rngs=rngs)
        self.position = nnx.Embed(cfg.max_position, cfg.hidden_size, embedding_init=init(None, "embed"), rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init(None, "embed"), rngs=rngs)
        self.norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.cfg = cfg

    def __call__(self, input_ids, token_type_ids, attention_mask, key):
        # Gather the fsdp-sharded table before the lookup (as FSDP does for every weight), so
        # the partitioner never has to reshard the gather's output from the table's layout.
        table_VD = constrain(self.word.embedding[...], "vocab", None)
        words_BTD = jnp.take(table_VD, input_ids, axis=0)
        positions_BTD = self.position(segment_positions(attention_mask))
        x_BTD = words_BTD + positions_BTD + self.token_type(token_type_ids)
        x_BTD = self.norm(x_BTD).astype(self.cfg.dtype)
        return constrain(dropout(x_BTD, self.cfg.dropout, key), "batch", "seq", None)


class Layer(nnx.Module):
    """One post-LayerNorm transformer block: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        D, N, H, F = cfg.hidden_size, cfg.num_heads, cfg.head_size, cfg.intermediate_size
        self.query = _dense(cfg, D, (N, H), ["embed"], ["heads", "kv"], rngs)
        self.key = _dense(cfg, D, (N, H), ["embed"], ["heads", "kv"], rngs)
        self.value = _dense(cfg, D, (N, H), ["embed"], ["heads", "kv"], rngs)
        self.attn_out = _dense(cfg, (N, H), D, ["heads", "kv"], ["embed"], rngs, axis=(-2, -1))
        self.attn_norm = layer_norm(D, cfg.layer_norm_eps, rngs)
        self.mlp_in = _dense(cfg, D, F, ["embed"], ["mlp"], rngs)
        self.mlp_out = _dense(cfg, F, D, ["mlp"], ["embed"], rngs)
        self.mlp_norm = layer_norm(D, cfg.layer_norm_eps, rngs)
        self.cfg = cfg

    def __call__(self, x_BTD, mask_BTS, key):
        cfg = self.cfg
        q_BTNH = constrain(self.query(x_BTD), "batch", "seq", "heads", "kv")
        k_BSNH = constrain(self.key(x_BTD), "batch", "seq", "heads", "kv")
        v_BSNH = constrain(self.value(x_BTD), "batch", "seq", "heads", "kv")
        ctx_BTNH = dot_product_attention(q_BTNH, k_BSNH, v_BSNH, dtype=cfg.dtype, mask_BTS=mask_BTS,
                                         dropout_rate=cfg.attention_dropout, key=fold(key, 0),
                                         implementation=cfg.attention)
        attn_BTD = dropout(self.attn_out(ctx_BTNH), cfg.dropout, fold(key, 1))
        x_BTD = self.attn_norm(x_BTD + attn_BTD).astype(cfg.dtype)

        h_BTF = constrain(jax.nn.gelu(self.mlp_in(x_BTD), approximate=False), "batch", "seq", "mlp")
        mlp_BTD = dropout(self.mlp_out(h_BTF), cfg.dropout, fold(key, 2))
        x_BTD = self.mlp_norm(x_BTD + mlp_BTD).astype(cfg.dtype)
        return constrain(x_BTD, "batch", "seq", None)


class BertEncoder(nnx.Module):
    """Embeddings, the transformer stack and the tanh pooler over [CLS]."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.embed = Embeddings(cfg, rngs)
        self.layers = make_stack(lambda rngs: Layer(cfg, rngs), cfg.num_layers, rngs,
                                 scan=cfg.scan_layers)
        self.pooler = _dense(cfg, cfg.hidden_size, cfg.hidden_size, ["embed"], [None], rngs)
        self.cfg = cfg

    def __call__(self, input_ids, token_type_ids, attention_mask, *, key=None):
        """Returns (hidden states BTD, pooled BD). `key=None` disables dropout."""
        mask_BTS = segment_mask(attention_mask)
        x_BTD = self.embed(input_ids, token_type_ids, attention_mask, fold(key, 0))
        x_BTD = run_stack(self.layers, x_BTD, mask_BTS, key=key, key_offset=1, remat=self.cfg.remat)
        pooled_BD = jnp.tanh(self.pooler(x_BTD[:, 0]))
        return x_BTD, pooled_BD


class BertForPreTraining(nnx.Module):
    """Encoder with the MLM head (tied to the word embeddings) and the NSP head."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.encoder = BertEncoder(cfg, rngs)
        self.mlm_transform = _dense(cfg, cfg.hidden_size, cfg.hidden_size, ["embed"], [None], rngs)
        self.mlm_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.mlm_bias = nnx.Param(zeros("vocab")(rngs.params(), (cfg.vocab_size,)))
        self.nsp = _dense(cfg, cfg.hidden_size, 2, ["embed"], [None], rngs)
        self.cfg = cfg

    def __call__(self, input_ids, token_type_ids, attention_mask, masked_positions=None, *, key=None,
                 hidden: bool = False):
        """Returns (MLM logits, NSP logits BC), both float32, and with `hidden` the last hidden
        states BTD too (pretraining distillation's cosine loss, pretrain/distill.py).

        With `masked_positions` (BP) the vocabulary projection runs only at those P positions,
        as the original BERT did (logits BPV); without, at every position (logits BTV).
        """
        x_BTD, pooled_BD = self.encoder(input_ids, token_type_ids, attention_mask, key=key)
        last_BTD = x_BTD
        if masked_positions is not None:
            x_BTD = jnp.take_along_axis(x_BTD, masked_positions[..., None], axis=1)
        h_BTD = jax.nn.gelu(self.mlm_transform(x_BTD), approximate=False)
        h_BTD = self.mlm_norm(h_BTD).astype(self.cfg.dtype)
        logits_BTV = tied_logits(h_BTD, self.encoder.embed.word.embedding[...], self.mlm_bias[...])
        logits_BTV = constrain(logits_BTV, "batch", None, "vocab")
        nsp_BC = self.nsp(pooled_BD).astype(jnp.float32)
        return (logits_BTV, nsp_BC, last_BTD) if hidden else (logits_BTV, nsp_BC)


# ---------------------------------------------------------------------------------------------
# The family spec: what the shared code asks of BERT (models/family.py)
# ---------------------------------------------------------------------------------------------

def size_name(cfg: BertConfig) -> str:
    """The SIZES name of an encoder shape, or "custom"."""
    for name, (layers, hidden, heads) in SIZES.items():
        if (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (
                layers, hidden, heads, 4 * hidden):
            return name
    return "custom"


def _sequence_budget(c, trainer: str) -> str | None:
    if trainer == "pretrain" and c.data.max_predictions > c.data.max_seq_len:
        return (f"data.max_predictions={c.data.max_predictions} exceeds "
                f"data.max_seq_len={c.data.max_seq_len}; lower it")
    if trainer == "pretrain" and c.data.max_seq_len > c.model.max_position:
        return (f"data.max_seq_len={c.data.max_seq_len} exceeds "
                f"model.max_position={c.model.max_position}; raise model.max_position")
    return None


def _checks() -> dict:
    model = {
        "model.size": Choice(tuple(SIZES), "BERT size"),
        "model.vocab_size": NONNEG,         # set by the run from the tokenizer
        "model.max_position": COUNT,
        "model.dropout": DROPOUT,
        "model.attention_dropout": DROPOUT,
        "model.scan_layers": Bool(),
        "model.attention": Choice(ATTENTIONS, "attention implementation"),
        "data.tokenizer": Text(),
        "data.vocab_size": COUNT,
        "data.max_seq_len": Int(8),
    }
    return {
        "pretrain": {**model,
            # One source or a weighted mixture (news:0.7,task:rt_polarity:0.3): data/corpora.py
            # parses the weights and names a bad one.
            "data.source": Text(required=True, names=("news", "pydocs"),
                                prefixes=("files:", "tfds:", "task:", "news:", "pydocs:", "parquet:",
                                          "hf:"),
                                meaning="news, pydocs, files:PATTERN, tfds:NAME[:SPLIT], task:NAME, "
                                        "parquet:GLOB[:COLUMN], hf:PATH[:SPLIT][:COLUMN] or "
                                        "SOURCE:WEIGHT,SOURCE:WEIGHT,..."),
            "data.objective": Choice(OBJECTIVES, "pretraining objective"),
            "data.seed": SEED,
            "data.max_predictions": COUNT,
            "data.mask_prob": Real(0, 1, lo_open=True),
            "data.whole_word": Bool(),
            "data.short_seq_prob": PROB,
            "data.dupe_factor": COUNT,
            "data.eval_fraction": Real(0, 1, hi_open=True),
            "data.max_doc_tokens": COUNT,
            "data.shard_documents": COUNT,
            "data.prepare_workers": Int(0, special={-1: "one per CPU"}),
            "data.strict": Bool(),          # a bad corpus line refuses the corpus instead of skipping
            "data.max_skipped_share": PROB,
            "data.workers": NONNEG,
            "data.prefetch": NONNEG},
        "finetune": {**model,
            "model.classifier_dropout": DROPOUT,
            "model.pooling": Choice(POOLINGS, "pooling"),
            "data.task": Choice(TASKS + SQUAD_TASKS, "task", prefixes=TEXT_TASK_PREFIXES),
            # Span tasks (finetune/span.py): the windows of a long context and the answer search.
            "data.doc_stride": COUNT,
            "data.max_query_len": COUNT,
            "data.max_answer_len": COUNT,
            "data.n_best": COUNT},
    }


SPEC = register(FamilySpec(
    name="bert", config_class=BertConfig, sizes=SIZES, size_of=size_name,
    shape_fields=("vocab_size", "max_position", "num_layers", "hidden_size", "num_heads",
                  "intermediate_size", "type_vocab_size", "layer_norm_eps", "initializer_range"),
    pretrain="pretrain.bert", finetune="finetune.bert", hf="models.hf_bert:BERT",
    tokenizer="wordpiece", heads=("mlm_transform", "mlm_norm", "mlm_bias", "nsp", "encoder/pooler"),
    pretrain_sources=("BertForPreTraining", "BertForMaskedLM", "BertModel"),
    checks=_checks(), cross_check=_sequence_budget))
