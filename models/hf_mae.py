"""The ViT masked autoencoder's HuggingFace record: `ViTMAEForPreTraining`, `ViTMAEModel` and
`ViTForImageClassification`.

Our `encoder/...` (models/mae.py `MAEEncoder`) is HuggingFace's `ViTMAEModel`, kept under `vit.`
in the task models; `decoder/...` is `ViTMAEForPreTraining`'s `decoder.`; a fine-tuned
`{"encoder", "classifier"}` is a `ViTForImageClassification` (model_type `vit`: the same
embeddings, blocks and final LayerNorm, logits = classifier(hidden[:, 0])). Facts checked on
transformers 5.24 (tests/test_hf_mae.py):

- Weights come in three spellings. Released checkpoints (and this export) say
  `vit.encoder.layer.N.attention.attention.query`, `...attention.output.dense`,
  `...intermediate.dense`, `...output.dense` and `decoder.decoder_layers.N...`; the in-memory
  `state_dict` says `vit.layers.N.attention.q_proj`, `attention.o_proj`, `mlp.fc1`, `mlp.fc2`
  (and `decoder.decoder_layers.N.attention.q_proj`); `save_pretrained` writes the encoder as
  released but the decoder as `decoder.decoder_encoder.layer.N.attention.attention.query`.
  transformers loads all three; so does import (`renames`).
- ViTMAE stores its fixed 2-D sin-cos tables (`vit.embeddings.position_embeddings` (1, L+1, D),
  `decoder.decoder_pos_embed` (1, L+1, E)); a model transformers builds from a config has them
  at zero until its `initialize_weights` runs. ViT's position embeddings are a learned
  parameter: export writes the sin-cos table as its value, and import refuses a classifier
  whose table is anything else, since our encoder's positions are fixed.
- `layer_norm_eps` defaults to 1e-12 in both configs (MAE: 1e-6), so it is always written.
- `ViTImageProcessor` needs torchvision; without it `AutoImageProcessor` gives
  `ViTImageProcessorPil` from the same preprocessor_config.json. Resizing is PIL's antialiased
  bilinear to size x size (a non-square image is squashed, where our eval pipeline crops its
  centre square first), then (pixel / 255 - mean) / std per channel.
"""

from __future__ import annotations

from models.hf_table import Architecture, ConversionError, Family, Rule, conv, dense, norm
from models.mae import MAEConfig, sincos_position_table

# Per-channel mean and std of pixels in [0, 1] that a run without `data.image_mean` / `image_std`
# in its config used, as data/images.py chooses them: MNIST's for `mnist`, ImageNet's for three
# channels, 0.5 otherwise.
MNIST_STATS = ((0.1307,), (0.3081,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as preprocessor_config.json spells it


def _block(ours: str, hf: str, width: str, heads: str, head: str, mlp: str) -> list[Rule]:
    """One pre-LayerNorm ViT block, in the released spelling."""
    attention = []
    for name in ("query", "key", "value"):
        w, b = dense(f"{ours}/{name}", f"{hf}.attention.attention.{name}", width, f"{heads} {head}")
        attention += [w, b._replace(when=lambda c: c.qkv_bias)]
    return [*norm(f"{ours}/attn_norm", f"{hf}.layernorm_before", width), *attention,
            *dense(f"{ours}/attn_out", f"{hf}.attention.output.dense", f"{heads} {head}", width),
            *norm(f"{ours}/mlp_norm", f"{hf}.layernorm_after", width),
            *dense(f"{ours}/mlp_in", f"{hf}.intermediate.dense", width, mlp),
            *dense(f"{ours}/mlp_out", f"{hf}.output.dense", mlp, width)]


# K patch size, I channels, P = K*K*I pixels of a patch, T = L + 1 positions; D encoder width,
# N heads of H, F feed-forward; E decoder width, M heads of G, R feed-forward. {i} encoder
# blocks, {j} decoder blocks. Our patch kernel (K*K*I, D) is the Conv2d (D, I, K, K) on
# patchified pixels (models/mae.py patch_kernel_to_conv); our class and mask tokens (D,) are
# HuggingFace's (1, 1, D).
MAE_RULES = (
    Rule("patch_embed/kernel", "embeddings.patch_embeddings.projection.weight", "(K K I) D", conv(2)),
    Rule("patch_embed/bias", "embeddings.patch_embeddings.projection.bias", "D"),
    Rule("cls_token", "embeddings.cls_token", "(1 1 D)"),
    Rule(None, "embeddings.position_embeddings", "1 T D",
         fixed=lambda c: sincos_position_table(c.grid_size, c.hidden_size)[None]),
    *_block("layers/{i}", "encoder.layer.{i}", "D", "N", "H", "F"),
    *norm("norm", "layernorm"),
)

DECODER_RULES = (
    *dense("decoder/embed", "decoder.decoder_embed", "D", "E"),
    Rule("decoder/mask_token", "decoder.mask_token", "(1 1 E)"),
    Rule(None, "decoder.decoder_pos_embed", "1 T E",
         fixed=lambda c: sincos_position_table(c.grid_size, c.decoder_hidden_size)[None]),
    *_block("decoder/layers/{j}", "decoder.decoder_layers.{j}", "E", "M", "G", "R"),
    *norm("decoder/norm", "decoder.decoder_norm", "E"),
    *dense("decoder/pred", "decoder.decoder_pred", "E", "P"),
)

# config.json key -> our MAEConfig field, for the fields both configs have.
CONFIG_KEYS = {
    "image_size": "image_size", "patch_size": "patch_size", "num_channels": "num_channels",
    "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "intermediate_size": "intermediate_size",
    "decoder_hidden_size": "decoder_hidden_size", "decoder_num_hidden_layers": "decoder_layers",
    "decoder_num_attention_heads": "decoder_heads",
    "decoder_intermediate_size": "decoder_intermediate_size",
    "mask_ratio": "mask_ratio", "norm_pix_loss": "norm_pix_loss", "qkv_bias": "qkv_bias",
    "hidden_dropout_prob": "dropout", "attention_probs_dropout_prob": "attention_dropout",
    "layer_norm_eps": "layer_norm_eps", "initializer_range": "initializer_range",
}
# What transformers' configs assume for a key they leave out: ViTMAEConfig's defaults (a ViT
# config has no decoder; ours needs one, which an encoder-only import never uses).
HF_DEFAULTS = {"decoder_hidden_size": 512, "decoder_num_hidden_layers": 8,
               "decoder_num_attention_heads": 16, "decoder_intermediate_size": 2048,
               "mask_ratio": 0.75, "norm_pix_loss": False, "qkv_bias": True,
               "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
               "layer_norm_eps": 1e-12, "initializer_range": 0.02}


def mae_to_hf(cfg: MAEConfig) -> dict:
    """The ViTMAE keys of config.json (hf.hf_config adds architectures, model_type and dtype).
    A ViT classifier's config carries the decoder keys too: ViT ignores them, and import gets
    back the config the encoder was pretrained with."""
    return {"hidden_act": "gelu",  # exact erf GELU, as models/mae.py
            **{theirs: getattr(cfg, ours) for theirs, ours in CONFIG_KEYS.items()}}


def mae_from_hf(config: dict) -> MAEConfig:
    """Our MAEConfig for a ViTMAE or ViT config.json; refuses what our model does not run."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"config.json has hidden_act={config['hidden_act']!r}; only 'gelu' "
                              f"is supported")
    values = {}
    for theirs, ours in CONFIG_KEYS.items():
        if theirs not in config and theirs not in HF_DEFAULTS:
            raise ConversionError(f"config.json lacks {theirs!r}")
        value = config.get(theirs, HF_DEFAULTS.get(theirs))
        if theirs in ("image_size", "patch_size") and isinstance(value, (list, tuple)):
            if len(value) != 2 or value[0] != value[1]:
                raise ConversionError(f"config.json has {theirs}={value}; only square images and "
                                      f"patches are supported")
            value = value[0]
        values[ours] = value
    try:
        return MAEConfig(**values)
    except ValueError as e:
        raise ConversionError(f"config.json: {e}") from None


def image_stats(run_config: dict, cfg: MAEConfig) -> tuple:
    """The per-channel (mean, std) a run normalised its pixels with: `data.image_mean` and
    `data.image_std` in its config, else what data/images.py picks for `data.source`."""
    data = run_config.get("data") or {}
    if data.get("image_mean") is not None or data.get("image_std") is not None:
        return data.get("image_mean"), data.get("image_std")
    if data.get("source") == "mnist":
        return MNIST_STATS
    return IMAGENET_STATS if cfg.num_channels == 3 else ((0.5,) * cfg.num_channels,) * 2


def image_processor(cfg: MAEConfig, stats) -> dict:
    """preprocessor_config.json: a ViTImageProcessor that turns uint8 images into our inputs."""
    mean, std = ([float(v) for v in values] if values is not None else None for values in stats)
    for what, values in (("image_mean", mean), ("image_std", std)):
        if values is None or len(values) != cfg.num_channels:
            raise ConversionError(f"{what} {values} must have one value per channel "
                                  f"({cfg.num_channels})")
    if min(std) <= 0:
        raise ConversionError(f"image_std {std} must be positive")
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": cfg.image_size, "width": cfg.image_size}, "resample": PIL_BILINEAR,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": mean, "image_std": std}


MAE = Family(
    model_type="vit_mae", config=MAEConfig, rules=MAE_RULES,
    dims={"K": "patch_size", "I": "num_channels", "P": "patch_dim",
          "T": lambda c: c.num_patches + 1, "D": "hidden_size", "N": "num_heads",
          "H": lambda c: c.hidden_size // c.num_heads, "F": "intermediate_size",
          "E": "decoder_hidden_size", "M": "decoder_heads",
          "G": lambda c: c.decoder_hidden_size // c.decoder_heads,
          "R": "decoder_intermediate_size"},
    depths={"i": "num_layers", "j": "decoder_layers"},
    to_hf=mae_to_hf, from_hf=mae_from_hf, base="ViTMAEModel",
    architectures={
        "ViTForImageClassification": Architecture(
            tuple(dense("classifier", "classifier", "D", "C")), "vit.", marker="classifier",
            labels="classifier/bias", model_type="vit"),
        "ViTMAEForPreTraining": Architecture(DECODER_RULES, "vit.", marker="decoder"),
        "ViTMAEModel": Architecture(),
    },
    prefix="vit.",
    # transformers 5.24's other spellings (see above) -> the released ones the rules use.
    renames=((r"^layers\.(\d+)\.", r"encoder.layer.\1."),
             (r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),
             (r"\.attention\.q_proj\.", ".attention.attention.query."),
             (r"\.attention\.k_proj\.", ".attention.attention.key."),
             (r"\.attention\.v_proj\.", ".attention.attention.value."),
             (r"\.attention\.o_proj\.", ".attention.output.dense."),
             (r"\.mlp\.fc1\.", ".intermediate.dense."),
             (r"\.mlp\.fc2\.", ".output.dense.")),
    from_model_config=MAEConfig.from_model_config, image_processor=image_processor,
    image_stats=image_stats)
