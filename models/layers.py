"""Blocks shared by the model families: sharded initialisers, activation constraints, dropout.

Model code names logical axes only (`batch, seq, embed, heads, kv, mlp, vocab, patch`); the one
table that maps them onto the `(data, fsdp, tensor)` mesh lives in `training/mesh.py` and is in
force through `flax.core.spmd.logical_axis_rules` while a step is traced.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec as P


def sharded(init, *axes):
    """An initialiser whose variable carries logical axis names (None: never sharded)."""
    return nnx.with_partitioning(init, axes)


def normal(stddev: float, *axes):
    return sharded(nnx.initializers.normal(stddev), *axes)


def zeros(*axes):
    return sharded(nnx.initializers.zeros_init(), *axes)


def ones(*axes):
    return sharded(nnx.initializers.ones_init(), *axes)


def constrain(x: jax.Array, *axes) -> jax.Array:
    """Pin an activation's sharding by logical axis names; a no-op outside a mesh and rules."""
    rules = spmd.get_logical_axis_rules()
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spmd.apply_rules(P(*axes), ()))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout from an explicit key; `key=None` means deterministic (eval)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def fold(key: jax.Array | None, i: int) -> jax.Array | None:
    """A sub-stream of `key` for site `i` (None stays None), so every dropout site differs."""
    return None if key is None else jax.random.fold_in(key, i)


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Statistics in float32 whatever the compute dtype: bf16 variance loses too much.
    return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32,
                         scale_init=ones("embed"), bias_init=zeros("embed"), rngs=rngs)


def dense(d_in, d_out, in_axes, out_axes, *, kernel_init, dtype, rngs: nnx.Rngs, axis=-1,
          use_bias: bool = True) -> nnx.LinearGeneral:
    """A LinearGeneral whose kernel (in dims..., out dims...) and bias carry logical axis names."""
    in_axes, out_axes = tuple(in_axes), tuple(out_axes)
    return nnx.LinearGeneral(
        d_in, d_out, axis=axis, use_bias=use_bias, dtype=jnp.dtype(dtype),
        kernel_init=sharded(kernel_init, *in_axes, *out_axes),
        bias_init=zeros(*out_axes), rngs=rngs)


# model.attention: which dot-product attention runs (see `dot_product_attention`).
ATTENTIONS = ("auto", "reference", "xla", "cudnn")


def attention_implementation(choice: str, dtype, dropout_active: bool) -> str:
    """The path `choice` means on this platform. "auto": cuDNN flash attention on GPU in 16-bit
    (cuDNN has no float32 kernel), the reference einsums elsewhere (on CPU they run attention's
    forward and backward 1.2-1.3x faster than jax.nn.dot_product_attention's XLA path:
    benchmarks/RESULTS.md). Attention dropout needs the probabilities, which only the reference
    einsums materialise, so it always takes that path."""
    if choice not in ATTENTIONS:
        raise ValueError(f"unknown attention {choice!r}; choose one of {', '.join(ATTENTIONS)}")
    if dropout_active:
        return "reference"
    if choice != "auto":
        return choice
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if jax.default_backend() == "gpu" and half else "reference"


def dot_product_attention(q_BTNH, k_BSNH, v_BSNH, *, dtype, mask_BTS=None, dropout_rate=0.0,
                          key=None, implementation: str = "reference") -> jax.Array:
    """softmax(q k / sqrt(H)) v with scores and softmax in float32 whatever `dtype`.

    `mask_BTS` (bool, broadcastable to B T S): False = query t ignores key s. `implementation`:
    one of ATTENTIONS; "xla" and "cudnn" are `jax.nn.dot_product_attention`'s, "reference" the
    einsums below (the only one with attention dropout: see `attention_implementation`).
    """
    dropout_active = key is not None and dropout_rate > 0
    path = attention_implementation(implementation, dtype, dropout_active)
    mask_BNTS = None if mask_BTS is None else mask_BTS[:, None]
    if path != "reference":
        return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask_BNTS,
                                            implementation=path).astype(dtype)
    H = q_BTNH.shape[-1]
    scores_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH, preferred_element_type=jnp.float32)
    scores_BNTS = scores_BNTS / jnp.sqrt(H).astype(jnp.float32)
    if mask_BNTS is not None:
        scores_BNTS = jnp.where(mask_BNTS, scores_BNTS, jnp.finfo(jnp.float32).min)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1).astype(dtype)
    probs_BNTS = dropout(probs_BNTS, dropout_rate, key)
    return jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS, v_BSNH)
