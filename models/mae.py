"""ViT masked autoencoder (He et al. 2021): an encoder over the visible patches only, a narrower
decoder that fills in mask tokens, and a pixel MSE over the masked patches.

Computed as transformers' `ViTMAEForPreTraining` does (checked by tests/test_mae_model.py):
pre-LayerNorm blocks with exact GELU, fixed 2-D sin-cos positions (not parameters), a class token,
and per-image masking by argsort of a given `noise` (B x L uniform, drawn by the data pipeline).

Shapes: B batch, H x W x C image (channels last), p patch size, L = (H/p)(W/p) patches,
P = p*p*C pixels of one patch, K visible patches, S = K + 1 encoder tokens (class token first),
D encoder width, E decoder width, N heads, Q head size, F feed-forward. Parameters are float32;
`dtype` is the compute dtype; LayerNorm statistics are float32. Weights name logical axes only
(`patch` is the P pixels of one patch); `training/mesh.py` maps them onto the mesh.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infra.rules import DROPOUT, NONNEG, POOLINGS, IMAGE_TASKS, Bool, Choice, Int, Real, Text
from models.family import FamilySpec, register
from models.layers import (constrain, dense, dot_product_attention, dropout, fold, layer_norm,
                           normal, remat_name, run_stack)

# name: (encoder layers, width, heads), (decoder layers, width, heads), (image, patch, channels).
# Feed-forward is 4x width. base/large/huge are the paper's ViT-B/16, L/16, H/14 with its decoder.
SIZES = {
    "tiny": ((2, 64, 2), (2, 32, 2), (28, 7, 1)),
    "small": ((4, 128, 4), (2, 64, 2), (28, 4, 1)),
    "base": ((12, 768, 12), (8, 512, 16), (224, 16, 3)),
    "large": ((24, 1024, 16), (8, 512, 16), (224, 16, 3)),
    "huge": ((32, 1280, 16), (8, 512, 16), (224, 14, 3)),
}

NORM_PIX_EPS = 1e-6  # transformers and the MAE code: (var + 1e-6) ** 0.5


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    image_size: int
    patch_size: int
    num_channels: int
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    decoder_layers: int
    decoder_hidden_size: int
    decoder_heads: int
    decoder_intermediate_size: int
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    qkv_bias: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0        # stochastic depth of the encoder's last block (fine-tuning)
    layer_norm_eps: float = 1e-6  # the MAE paper's; transformers defaults to 1e-12
    initializer_range: float = 0.02
    dtype: str = "float32"
    remat: str = "none"  # a models/layers.py REMAT_POLICIES name (true/false: full/none)

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_name(self.remat))
        S, p = self.image_size, self.patch_size
        if p < 1 or S % p:
            multiples = f"{S // p * p} or {(S // p + 1) * p}" if p >= 1 and S >= p else f"{p}"
            raise ValueError(f"image_size {S} is not divisible by patch_size {p}; set the image "
                             f"size to a multiple of {p} (e.g. {multiples}) or choose another "
                             "patch size")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {self.mask_ratio} must be in (0, 1), e.g. 0.75")
        if self.num_visible < 1:
            raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible patch of "
                             f"{self.num_patches}; lower it")
        for what, width, heads in (("hidden_size", self.hidden_size, self.num_heads),
                                   ("decoder_hidden_size", self.decoder_hidden_size,
                                    self.decoder_heads)):
            if width % 4 or width % heads:
                raise ValueError(f"{what} {width} must be a multiple of 4 (sin-cos positions) "
                                 f"and of its {heads} heads")

    @classmethod
    def of_size(cls, size: str, **overrides) -> "MAEConfig":
        if size not in SIZES:
            raise ValueError(f"unknown MAE size {size!r}; choose one of {', '.join(SIZES)}")
        (layers, width, heads), (d_layers, d_width, d_heads), (image, patch, channels) = SIZES[size]
        fields = dict(image_size=image, patch_size=patch, num_channels=channels,
                      num_layers=layers, hidden_size=width, num_heads=heads,
                      intermediate_size=4 * width, decoder_layers=d_layers,
                      decoder_hidden_size=d_width, decoder_heads=d_heads,
                      decoder_intermediate_size=4 * d_width)
        return cls(**{**fields, **overrides})

    @classmethod
    def from_model_config(cls, model_cfg) -> "MAEConfig":
        """From a run config's `model` group: `size` and the fields named like ours, or (`size`
        empty: a custom shape, as `--init` writes it) every field spelled out."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in dict(model_cfg).items() if k in names}
        return cls.of_size(model_cfg["size"], **fields) if model_cfg["size"] else cls(**fields)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size ** 2 * self.num_channels

    @property
    def num_visible(self) -> int:
        # Exactly transformers' len_keep (float arithmetic included): int(L * (1 - ratio)).
        return int(self.num_patches * (1 - self.mask_ratio))

    @property
    def num_masked(self) -> int:
        return self.num_patches - self.num_visible


# ---------------------------------------------------------------------------------------------
# Patches, positions, masking
# ---------------------------------------------------------------------------------------------

def patchify(pixels_BHWC: jax.Array, patch_size: int) -> jax.Array:
    """BHWC -> BLP, patches row-major, pixels of a patch in (row, column, channel) order."""
    B, Hh, Ww, C = pixels_BHWC.shape
    p = patch_size
    x = pixels_BHWC.reshape(B, Hh // p, p, Ww // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (Hh // p) * (Ww // p), p * p * C)


def unpatchify(patches_BLP: jax.Array, patch_size: int, num_channels: int) -> jax.Array:
    """BLP -> BHWC for a square image: the inverse of `patchify` (e.g. to look at logits)."""
    B, L, _ = patches_BLP.shape
    g, p, C = int(round(L ** 0.5)), patch_size, num_channels
    x = patches_BLP.reshape(B, g, g, p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, g * p, g * p, C)


def patch_kernel_to_conv(kernel_PD, patch_size: int, num_channels: int):
    """Our patch projection (p*p*C, D) as the equivalent Conv2d weight (D, C, p, p) (HF's)."""
    p, C = patch_size, num_channels
    return kernel_PD.reshape(p, p, C, -1).transpose(3, 2, 0, 1)


def patch_kernel_from_conv(weight_DCpp):
    """A Conv2d weight (D, C, p, p) with kernel = stride = p as our (p*p*C, D) projection."""
    D, C, p, _ = weight_DCpp.shape
    return weight_DCpp.transpose(2, 3, 1, 0).reshape(p * p * C, D)


@functools.lru_cache(maxsize=None)
def sincos_position_table(grid_size: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos positions, (1 + grid^2, dim) float32, as transformers' ViTMAE builds them.

    Row 0 (class token) is zeros; row 1 + h*grid + w is [sin(w f) | cos(w f) | sin(h f) | cos(h f)]
    with f_k = 10000^(-k / (dim/4)), computed in float64. Width comes first: the released MAE
    weights use that layout (transformers swaps its halves to match).
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    freq = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    h, w = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                       np.arange(grid_size, dtype=np.float64), indexing="ij")
    angle_h, angle_w = np.outer(h.ravel(), freq), np.outer(w.ravel(), freq)
    table = np.concatenate([np.sin(angle_w), np.cos(angle_w), np.sin(angle_h), np.cos(angle_h)], 1)
    table = np.concatenate([np.zeros((1, dim)), table]).astype(np.float32)
    table.setflags(write=False)  # cached and shared: nobody may edit it
    return table


def random_masking(noise_BL: jax.Array, num_visible: int):
    """Per-image masking by argsort of `noise`, as transformers' `random_masking`.

    Keeps the `num_visible` patches of smallest noise, in ascending noise order. Returns
    (ids_keep BK, mask BL float32 with 1 = removed, ids_restore BL: the un-shuffling gather).
    """
    ids_shuffle_BL = jnp.argsort(noise_BL, axis=1)
    ids_restore_BL = jnp.argsort(ids_shuffle_BL, axis=1)
    mask_BL = (ids_restore_BL >= num_visible).astype(jnp.float32)
    return ids_shuffle_BL[:, :num_visible], mask_BL, ids_restore_BL


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

# MAE initialises every Linear (and the patch projection) xavier-uniform, biases zero.
# LinearGeneral initialises its kernel flattened to (all in dims, all out dims), so the fans are
# those of the torch Linear: D -> N*Q for a query, N*Q -> D for the output.
XAVIER = jax.nn.initializers.xavier_uniform()


def _linear(cfg: MAEConfig, d_in: int, d_out: int, in_axis: str | None, out_axis: str | None,
            rngs) -> nnx.LinearGeneral:
    return dense(d_in, d_out, [in_axis], [out_axis], kernel_init=XAVIER, dtype=cfg.dtype,
                 rngs=rngs)


class Block(nnx.Module):
    """One pre-LayerNorm ViT block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, cfg: MAEConfig, width: int, heads: int, mlp_width: int, rngs: nnx.Rngs,
                 drop_path: float = 0.0):
        D, N, Q, F = width, heads, width // heads, mlp_width
        self.drop_path = drop_path
        to_heads = lambda: dense(D, (N, Q), ["embed"], ["heads", "kv"], kernel_init=XAVIER,
                                 dtype=cfg.dtype, use_bias=cfg.qkv_bias, rngs=rngs)
        self.attn_norm = layer_norm(D, cfg.layer_norm_eps, rngs)
        self.query, self.key, self.value = to_heads(), to_heads(), to_heads()
        self.attn_out = dense((N, Q), D, ["heads", "kv"], ["embed"], axis=(-2, -1),
                              kernel_init=XAVIER, dtype=cfg.dtype, rngs=rngs)
        self.mlp_norm = layer_norm(D, cfg.layer_norm_eps, rngs)
        self.mlp_in = _linear(cfg, D, F, "embed", "mlp", rngs)
        self.mlp_out = _linear(cfg, F, D, "mlp", "embed", rngs)
        self.cfg = cfg

    def __call__(self, x_BTD, key):
        cfg = self.cfg
        h_BTD = self.attn_norm(x_BTD).astype(cfg.dtype)
        q_BTNQ = constrain(self.query(h_BTD), "batch", "seq", "heads", "kv")
        k_BTNQ = constrain(self.key(h_BTD), "batch", "seq", "heads", "kv")
        v_BTNQ = constrain(self.value(h_BTD), "batch", "seq", "heads", "kv")
        ctx_BTNQ = dot_product_attention(q_BTNQ, k_BTNQ, v_BTNQ, dtype=cfg.dtype,
                                         dropout_rate=cfg.attention_dropout, key=fold(key, 0))
        x_BTD = x_BTD + _drop_path(dropout(self.attn_out(ctx_BTNQ), cfg.dropout, fold(key, 1)),
                                   self.drop_path, fold(key, 3))

        h_BTD = self.mlp_norm(x_BTD).astype(cfg.dtype)
        h_BTF = constrain(jax.nn.gelu(self.mlp_in(h_BTD), approximate=False),
                          "batch", "seq", "mlp")
        x_BTD = x_BTD + _drop_path(dropout(self.mlp_out(h_BTF), cfg.dropout, fold(key, 2)),
                                   self.drop_path, fold(key, 4))
        return constrain(x_BTD, "batch", "seq", None)


def _drop_path(branch_BTD, rate: float, key):
    """Stochastic depth: the whole residual branch of an example is dropped with `rate`."""
    if key is None or rate == 0.0:
        return branch_BTD
    keep_B11 = jax.random.bernoulli(key, 1.0 - rate, (branch_BTD.shape[0], 1, 1))
    return jnp.where(keep_B11, branch_BTD / (1.0 - rate), 0).astype(branch_BTD.dtype)


class MAEEncoder(nnx.Module):
    """Patch projection + fixed positions, a class token, pre-LN blocks and a final LayerNorm."""

    def __init__(self, cfg: MAEConfig, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.patch_embed = _linear(cfg, cfg.patch_dim, D, "patch", "embed", rngs)
        self.cls_token = nnx.Param(normal(cfg.initializer_range, "embed")(rngs.params(), (D,)))
        # Stochastic depth grows linearly with depth, to cfg.drop_path at the last block.
        rates = np.linspace(0.0, cfg.drop_path, cfg.num_layers) if cfg.num_layers else []
        self.layers = nnx.List([Block(cfg, D, cfg.num_heads, cfg.intermediate_size, rngs,
                                      drop_path=float(rate)) for rate in rates])
        self.norm = layer_norm(D, cfg.layer_norm_eps, rngs)
        self.cfg = cfg

    def __call__(self, pixels_BHWC, ids_keep_BK=None, *, key=None):
        """Hidden states BSD of the class token and the kept patches (all patches when
        `ids_keep_BK` is None: S = L + 1). `key=None` disables dropout."""
        cfg = self.cfg
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if tuple(pixels_BHWC.shape[1:]) != expected:
            raise ValueError(f"pixels of shape {tuple(pixels_BHWC.shape)}; the model takes "
                             f"(batch, {', '.join(map(str, expected))}) channels last")
        pos_TD = jnp.asarray(sincos_position_table(cfg.grid_size, cfg.hidden_size))
        patches_BLP = patchify(pixels_BHWC, cfg.patch_size).astype(cfg.dtype)
        x_BLD = self.patch_embed(patches_BLP) + pos_TD[1:].astype(cfg.dtype)
        if ids_keep_BK is not None:
            x_BLD = jnp.take_along_axis(x_BLD, ids_keep_BK[..., None], axis=1)
        cls_1D = (self.cls_token[...] + pos_TD[0])[None].astype(cfg.dtype)
        cls_B1D = jnp.broadcast_to(cls_1D, (x_BLD.shape[0], *cls_1D.shape))
        x_BSD = constrain(jnp.concatenate([cls_B1D, x_BLD], axis=1), "batch", "seq", None)
        x_BSD = run_stack(self.layers, x_BSD, key=key, remat=cfg.remat)
        return self.norm(x_BSD).astype(cfg.dtype)

    def features(self, pixels_BHWC, *, key=None):
        """All patches, no masking (fine-tuning, linear probes). Returns (hidden states B(L+1)D,
        class-token feature BD, mean of the patch tokens BD), after the final LayerNorm."""
        x_BSD = self(pixels_BHWC, key=key)
        return x_BSD, x_BSD[:, 0], jnp.mean(x_BSD[:, 1:].astype(jnp.float32), axis=1)


class MAEDecoder(nnx.Module):
    """Projects the encoder's tokens to width E, puts mask tokens at the removed patches, adds
    its own fixed positions, runs pre-LN blocks and predicts every patch's P pixels."""

    def __init__(self, cfg: MAEConfig, rngs: nnx.Rngs):
        E = cfg.decoder_hidden_size
        self.embed = _linear(cfg, cfg.hidden_size, E, "embed", None, rngs)
        self.mask_token = nnx.Param(normal(cfg.initializer_range, "embed")(rngs.params(), (E,)))
        self.layers = nnx.List([Block(cfg, E, cfg.decoder_heads, cfg.decoder_intermediate_size,
                                      rngs) for _ in range(cfg.decoder_layers)])
        self.norm = layer_norm(E, cfg.layer_norm_eps, rngs)
        self.pred = _linear(cfg, E, cfg.patch_dim, "embed", "patch", rngs)
        self.cfg = cfg

    def __call__(self, latent_BSD, ids_restore_BL, *, key=None):
        """Pixel predictions BLP (float32) for every patch, in the image's patch order."""
        cfg = self.cfg
        x_BSE = self.embed(latent_BSD)
        B, S, E = x_BSE.shape
        L = ids_restore_BL.shape[1]
        masks_BME = jnp.broadcast_to(self.mask_token[...].astype(x_BSE.dtype), (B, L + 1 - S, E))
        # Kept tokens first (in shuffled order), then mask tokens; ids_restore puts each back.
        shuffled_BLE = jnp.concatenate([x_BSE[:, 1:], masks_BME], axis=1)
        patches_BLE = jnp.take_along_axis(shuffled_BLE, ids_restore_BL[..., None], axis=1)
        pos_TE = jnp.asarray(sincos_position_table(cfg.grid_size, E)).astype(cfg.dtype)
        x_BTE = jnp.concatenate([x_BSE[:, :1], patches_BLE], axis=1) + pos_TE
        x_BTE = run_stack(self.layers, constrain(x_BTE, "batch", "seq", None), key=key,
                          remat=cfg.remat)
        x_BTE = self.norm(x_BTE).astype(cfg.dtype)
        logits_BTP = self.pred(x_BTE).astype(jnp.float32)
        return constrain(logits_BTP[:, 1:], "batch", "seq", None)  # drop the class token


class MAEForPreTraining(nnx.Module):
    """Encoder over the visible patches and decoder over all of them."""

    def __init__(self, cfg: MAEConfig, rngs: nnx.Rngs):
        self.encoder = MAEEncoder(cfg, rngs)
        self.decoder = MAEDecoder(cfg, rngs)
        self.cfg = cfg

    def encode_visible(self, pixels_BHWC, noise_BL, *, key=None):
        """(latent BSD with S = visible + 1, mask BL with 1 = removed, ids_restore BL)."""
        ids_keep_BK, mask_BL, ids_restore_BL = random_masking(noise_BL, self.cfg.num_visible)
        latent_BSD = self.encoder(pixels_BHWC, ids_keep_BK, key=key)
        return latent_BSD, mask_BL, ids_restore_BL

    def __call__(self, pixels_BHWC, noise_BL, *, key=None):
        """Returns (reconstruction logits BLP float32, mask BL). `key=None` disables dropout."""
        latent_BSD, mask_BL, ids_restore_BL = self.encode_visible(pixels_BHWC, noise_BL,
                                                                  key=fold(key, 0))
        return self.decoder(latent_BSD, ids_restore_BL, key=fold(key, 1)), mask_BL


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------

def reconstruction_targets(pixels_BHWC, patch_size: int, norm_pix_loss: bool) -> jax.Array:
    """Patch pixels BLP, float32; with `norm_pix_loss` each patch standardised by its mean and
    unbiased variance (torch's `var`), dividing by (var + 1e-6) ** 0.5 as transformers does."""
    target_BLP = patchify(pixels_BHWC.astype(jnp.float32), patch_size)
    if norm_pix_loss:
        mean_BL1 = jnp.mean(target_BLP, axis=-1, keepdims=True)
        var_BL1 = jnp.var(target_BLP, axis=-1, keepdims=True, ddof=1)
        target_BLP = (target_BLP - mean_BL1) / (var_BL1 + NORM_PIX_EPS) ** 0.5
    return target_BLP


def reconstruction_sums(logits_BLP, pixels_BHWC, mask_BL, *, patch_size: int,
                        norm_pix_loss: bool) -> dict[str, jax.Array]:
    """{"mae_loss": per-patch MSE summed over the masked patches, "mae_count": their number}.

    Sums, not a mean, so gradient accumulation and evaluation can divide by the global count.
    Visible patches contribute nothing (their mask is 0)."""
    target_BLP = reconstruction_targets(pixels_BHWC, patch_size, norm_pix_loss)
    per_patch_BL = jnp.mean((logits_BLP.astype(jnp.float32) - target_BLP) ** 2, axis=-1)
    mask_BL = mask_BL.astype(jnp.float32)
    return {"mae_loss": jnp.sum(per_patch_BL * mask_BL), "mae_count": jnp.sum(mask_BL)}


def mean_loss(sums: dict) -> jax.Array:
    """The loss transformers reports: summed masked-patch MSE over the number of masked patches."""
    return sums["mae_loss"] / jnp.maximum(sums["mae_count"], 1.0)


# ---------------------------------------------------------------------------------------------
# The family spec: what the shared code asks of MAE (models/family.py)
# ---------------------------------------------------------------------------------------------

SHAPE_FIELDS = ("image_size", "patch_size", "num_channels", "num_layers", "hidden_size",
                "num_heads", "intermediate_size", "decoder_layers", "decoder_hidden_size",
                "decoder_heads", "decoder_intermediate_size", "qkv_bias", "layer_norm_eps",
                "initializer_range")


def size_name(cfg: MAEConfig) -> str:
    """The SIZES name of a shape, or "custom"."""
    for name in SIZES:
        sized = MAEConfig.of_size(name)
        if all(getattr(sized, f) == getattr(cfg, f) for f in SHAPE_FIELDS):
            return name
    return "custom"


def _checks() -> dict:
    model = {"model.size": Choice(tuple(SIZES), "MAE size"),
             "data.crop_scale_min": Real(0, 1, lo_open=True),
             "data.flip": Bool()}
    return {
        "pretrain": {**model,
            "model.image_size": Int(0),     # 0: the size's
            "model.patch_size": Int(0),
            "model.num_channels": Int(0),
            "model.mask_ratio": Real(0, 1, lo_open=True, hi_open=True),
            "model.norm_pix_loss": Bool(),
            "data.source": Text(required=True, names=("mnist",), prefixes=("tfds:",),
                                meaning="mnist or tfds:NAME"),
            "data.workers": NONNEG,
            "data.prefetch": NONNEG},
        "finetune": {**model,
            "model.drop_path": DROPOUT,
            "model.pooling": Choice(POOLINGS, "pooling"),
            "model.probe_norm": Bool(),
            "data.task": Text(required=True, names=IMAGE_TASKS, prefixes=("tfds:",),
                              meaning="mnist or tfds:NAME")},
    }


SPEC = register(FamilySpec(
    name="mae", config_class=MAEConfig, sizes=SIZES, size_of=size_name, shape_fields=SHAPE_FIELDS,
    pretrain="pretrain.mae", finetune="finetune.image", hf="models.hf_mae:MAE",
    heads=("decoder",), pretrain_sources=("ViTMAEForPreTraining", "ViTMAEModel"), checks=_checks()))
