"""BERT's HuggingFace record: `BertModel`, `BertForPreTraining`, `BertForMaskedLM`,
`BertForSequenceClassification`, `BertForTokenClassification`, `BertForQuestionAnswering`.

Our `encoder/...` is HuggingFace's `BertModel`, kept under `bert.` in the task models. Facts
checked on transformers 5.23: `save_pretrained` writes no `cls.predictions.decoder.{weight,bias}`:
the decoder is tied to the word embeddings and to `cls.predictions.bias` (`_tied_weights_keys`),
so neither do we, and on import such copies (older checkpoints) are accepted only when they equal
what they are tied to. `BertForMaskedLM` is `BertForPreTraining` without the pooler (it builds
its `BertModel` with `add_pooling_layer=False`) and without the NSP head. `hidden_act: "gelu"`
is the exact (erf) GELU our model uses.
"""

from models.bert import BertConfig
from models.hf_table import Architecture, Family, Rule, converted_config, dense, encoder_shape, norm

BERT_RULES = (
    Rule("embed/word/embedding", "embeddings.word_embeddings.weight", "V D"),
    Rule("embed/position/embedding", "embeddings.position_embeddings.weight", "P D"),
    Rule("embed/token_type/embedding", "embeddings.token_type_embeddings.weight", "Y D"),
    *norm("embed/norm", "embeddings.LayerNorm"),
    *dense("layers/{i}/query", "encoder.layer.{i}.attention.self.query", "D", "N H"),
    *dense("layers/{i}/key", "encoder.layer.{i}.attention.self.key", "D", "N H"),
    *dense("layers/{i}/value", "encoder.layer.{i}.attention.self.value", "D", "N H"),
    *dense("layers/{i}/attn_out", "encoder.layer.{i}.attention.output.dense", "N H", "D"),
    *norm("layers/{i}/attn_norm", "encoder.layer.{i}.attention.output.LayerNorm"),
    *dense("layers/{i}/mlp_in", "encoder.layer.{i}.intermediate.dense", "D", "F"),
    *dense("layers/{i}/mlp_out", "encoder.layer.{i}.output.dense", "F", "D"),
    *norm("layers/{i}/mlp_norm", "encoder.layer.{i}.output.LayerNorm"),
    *dense("pooler", "pooler.dense", "D", "D"),
)

MLM_HEAD = (
    *dense("mlm_transform", "cls.predictions.transform.dense", "D", "D"),
    *norm("mlm_norm", "cls.predictions.transform.LayerNorm"),
    Rule("mlm_bias", "cls.predictions.bias", "V"),
)
POOLER = ("pooler.dense.weight", "pooler.dense.bias")
MLM_TIED = (("cls.predictions.decoder.weight", "embeddings.word_embeddings.weight"),
            ("cls.predictions.decoder.bias", "cls.predictions.bias"))


def bert_to_hf(cfg: BertConfig) -> dict:
    """The BERT keys of config.json (hf.hf_config adds architectures, model_type and dtype)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",  # exact erf GELU, as models/bert.py
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.layer_norm_eps,
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
        "tie_word_embeddings": True,
    }


def bert_from_hf(config: dict) -> BertConfig:
    """Our BertConfig for a BERT config.json; refuses the variants our model does not run."""
    supported = {"hidden_act": "gelu", "position_embedding_type": "absolute", "is_decoder": False,
                 "add_cross_attention": False}
    return converted_config(config, supported, lambda: BertConfig(
        **encoder_shape(config),
        max_position=config.get("max_position_embeddings", 512),
        type_vocab_size=config.get("type_vocab_size", 2),
        dropout=config.get("hidden_dropout_prob", 0.1),
        attention_dropout=config.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        initializer_range=config.get("initializer_range", 0.02)))


BERT = Family(
    model_type="bert", config=BertConfig, rules=BERT_RULES,
    dims={"V": "vocab_size", "D": "hidden_size", "N": "num_heads", "H": "head_size",
          "F": "intermediate_size", "P": "max_position", "Y": "type_vocab_size"},
    depths={"i": "num_layers"}, to_hf=bert_to_hf, from_hf=bert_from_hf, base="BertModel",
    architectures={
        "BertForSequenceClassification": Architecture(
            tuple(dense("classifier", "classifier", "D", "C")), "bert.", marker="classifier",
            labels="classifier/bias"),
        # Its BertModel has no pooler; ours is left out on export.
        "BertForTokenClassification": Architecture(
            tuple(dense("token_classifier", "classifier", "D", "C")), "bert.",
            marker="token_classifier", labels="token_classifier/bias", lacks=POOLER),
        # BertModel without the pooler, a start and an end logit at every position.
        "BertForQuestionAnswering": Architecture(
            tuple(dense("qa_outputs", "qa_outputs", "D", "2")), "bert.", marker="qa_outputs",
            lacks=POOLER),
        "BertForPreTraining": Architecture((*MLM_HEAD, *dense("nsp", "cls.seq_relationship", "D", "2")),
                                           "bert.", marker="nsp", tied=MLM_TIED),
        # No marker: a tree with an MLM head has the NSP head too, so export infers the above.
        "BertForMaskedLM": Architecture(MLM_HEAD, "bert.", tied=MLM_TIED,
                                        lacks=POOLER),
        "BertModel": Architecture(),
    },
    prefix="bert.",
    # Older checkpoints: LayerNorm gamma/beta, and the position_ids buffer that is no parameter.
    renames=((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias")),
    ignored=(r"embeddings\.position_ids$",),
    from_model_config=BertConfig.from_model_config)
