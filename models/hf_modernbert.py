"""ModernBERT's HuggingFace record: `ModernBertModel`, `ModernBertForMaskedLM`,
`ModernBertForSequenceClassification`, `ModernBertForTokenClassification`,
`ModernBertForQuestionAnswering` (transformers 5.25).

Our `encoder/...` is `ModernBertModel`, kept under `model.` in the task models. Our fused
kernels are HF's fused weights transposed: `qkv` (D, 3, N, H) is `Wqkv` (3D, D) with q, k, v
stacked, `mlp_in` (D, 2, F) is `Wi` (2F, D), the input half then the gate half. Layer 0 has no
`attn_norm`. `decoder.weight` is tied to the token embeddings (`save_pretrained` leaves it out).
config.json: transformers 5.25 writes `layer_types` and `rope_parameters`; the released
checkpoints say `global_attn_every_n_layers`, `global_rope_theta` and `local_rope_theta`; both are
read. The special-token ids are written from our config: the defaults are the release's (pad
50283), out of range for another vocabulary, where building the torch model fails.
"""

from models.hf_table import Architecture, ConversionError, Family, Rule, converted_config, dense, encoder_shape, kernel
from models.modernbert import ModernBertConfig


def _scale(ours: str, hf: str, **kw) -> Rule:
    return Rule(f"{ours}/scale", f"{hf}.weight", "D", **kw)


MODERNBERT_RULES = (
    Rule("embed/embedding", "embeddings.tok_embeddings.weight", "V D"),
    _scale("embed_norm", "embeddings.norm"),
    _scale("layers/{i}/attn_norm", "layers.{i}.attn_norm", at=lambda at: at["i"] > 0),
    Rule("layers/{i}/qkv/kernel", "layers.{i}.attn.Wqkv.weight", "D 3 N H", kernel(1)),
    Rule("layers/{i}/attn_out/kernel", "layers.{i}.attn.Wo.weight", "N H D", kernel(2)),
    _scale("layers/{i}/mlp_norm", "layers.{i}.mlp_norm"),
    Rule("layers/{i}/mlp_in/kernel", "layers.{i}.mlp.Wi.weight", "D 2 F", kernel(1)),
    Rule("layers/{i}/mlp_out/kernel", "layers.{i}.mlp.Wo.weight", "F D", kernel(1)),
    _scale("final_norm", "final_norm"),
)

PREDICTION_HEAD = (Rule("head/dense/kernel", "head.dense.weight", "D D", kernel(1)),
                   _scale("head/norm", "head.norm"))

# The exact settings our model computes; config.json must agree (absent keys: the defaults).
FIXED = {"hidden_activation": "gelu", "classifier_activation": "gelu", "norm_bias": False,
         "attention_bias": False, "mlp_bias": False, "classifier_bias": False,
         "decoder_bias": True, "tie_word_embeddings": True}


def modernbert_to_hf(cfg: ModernBertConfig) -> dict:
    """The ModernBERT keys of config.json (hf.hf_config adds architectures, model_type, dtype)."""
    types = ["full_attention" if cfg.is_global(i) else "sliding_attention"
             for i in range(cfg.num_layers)]
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position,
        "initializer_range": cfg.initializer_range,
        "initializer_cutoff_factor": cfg.initializer_cutoff,
        "norm_eps": cfg.norm_eps,
        "layer_types": types,
        "global_attn_every_n_layers": cfg.global_every,  # what the released configs say
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_base},
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_base}},
        "local_attention": cfg.local_window,
        "embedding_dropout": cfg.dropout,
        "mlp_dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "pad_token_id": cfg.pad_token_id,
        "cls_token_id": cfg.cls_token_id,
        "bos_token_id": cfg.cls_token_id,
        "sep_token_id": cfg.sep_token_id,
        "eos_token_id": cfg.sep_token_id,
        **FIXED,
    }


def _global_every(config: dict) -> int:
    """The global-layer period that config.json's `layer_types` (or its older
    `global_attn_every_n_layers`) states; refuses a pattern other than "global iff i % n == 0"."""
    layers = config["num_hidden_layers"]
    every = int(config.get("global_attn_every_n_layers", 3))
    types = config.get("layer_types")
    if types is None:
        return every
    if len(types) != layers or types[0] != "full_attention":
        raise ConversionError(f"config.json layer_types {types} does not start a {layers}-layer "
                              f"stack with full_attention")
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    every = full[1] if len(full) > 1 else max(layers, every)
    want = ["full_attention" if i % every == 0 else "sliding_attention" for i in range(layers)]
    if types != want:
        raise ConversionError(f"config.json layer_types {types} is not full attention every "
                              f"n-th layer; only that pattern is supported")
    return every


def _rope_theta(config: dict, kind: str, legacy: str, default: float) -> float:
    params = (config.get("rope_parameters") or {}).get(kind) or {}
    if params.get("rope_type", "default") != "default":
        raise ConversionError(f"config.json has rope_type={params['rope_type']!r} for {kind}; "
                              f"only 'default' is supported")
    return float(params.get("rope_theta", config.get(legacy, default)))


def modernbert_from_hf(config: dict) -> ModernBertConfig:
    """Our ModernBertConfig for a ModernBERT config.json; refuses variants our model does not run."""
    return converted_config(config, FIXED, lambda: ModernBertConfig(
        **encoder_shape(config),
        max_position=config.get("max_position_embeddings", 8192),
        local_window=config.get("local_attention", 128),
        global_every=_global_every(config),
        global_rope_base=_rope_theta(config, "full_attention", "global_rope_theta", 160_000.0),
        local_rope_base=_rope_theta(config, "sliding_attention", "local_rope_theta", 10_000.0),
        norm_eps=config.get("norm_eps", 1e-5),
        dropout=config.get("mlp_dropout", 0.0),
        attention_dropout=config.get("attention_dropout", 0.0),
        initializer_range=config.get("initializer_range", 0.02),
        initializer_cutoff=config.get("initializer_cutoff_factor", 2.0),
        pad_token_id=config.get("pad_token_id", 50283),
        cls_token_id=config.get("cls_token_id", 50281),
        sep_token_id=config.get("sep_token_id", 50282)))


MODERNBERT = Family(
    model_type="modernbert", config=ModernBertConfig, rules=MODERNBERT_RULES,
    dims={"V": "vocab_size", "D": "hidden_size", "N": "num_heads", "H": "head_size",
          "F": "intermediate_size"},
    depths={"i": "num_layers"}, to_hf=modernbert_to_hf, from_hf=modernbert_from_hf,
    base="ModernBertModel",
    architectures={
        "ModernBertForSequenceClassification": Architecture(
            (*PREDICTION_HEAD, *dense("classifier", "classifier", "D", "C")), "model.",
            marker="classifier", labels="classifier/bias"),
        "ModernBertForTokenClassification": Architecture(
            (*PREDICTION_HEAD, *dense("token_classifier", "classifier", "D", "C")), "model.",
            marker="token_classifier", labels="token_classifier/bias"),
        # The prediction head on every position, then `classifier` to a start and an end logit.
        "ModernBertForQuestionAnswering": Architecture(
            (*PREDICTION_HEAD, *dense("qa_outputs", "classifier", "D", "2")), "model.",
            marker="qa_outputs"),
        "ModernBertForMaskedLM": Architecture(
            (*PREDICTION_HEAD, Rule("decoder_bias", "decoder.bias", "V")), "model.",
            marker="decoder_bias",
            tied=(("decoder.weight", "embeddings.tok_embeddings.weight"),)),
        "ModernBertModel": Architecture(),
    },
    prefix="model.",
    from_model_config=ModernBertConfig.from_model_config)
