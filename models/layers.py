"""Blocks shared by the model families: sharded initialisers, activation constraints, dropout,
and the transformer stack in either layout (unrolled or scanned) with its remat policy.

Model code names logical axes only (`batch, seq, embed, heads, kv, mlp, vocab, patch`); the one
table that maps them onto the `(data, fsdp, tensor)` mesh lives in `training/mesh.py` and is in
force through `flax.core.spmd.logical_axis_rules` while a step is traced.
"""

import math
from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.ad_checkpoint import checkpoint_name
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


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs, *, use_bias: bool = True) -> nnx.LayerNorm:
    # Statistics in float32 whatever the compute dtype: bf16 variance loses too much.
    return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, use_bias=use_bias,
                         scale_init=ones("embed"), bias_init=zeros("embed"), rngs=rngs)


def truncated_normal(stddev: float, cutoff: float = 2.0):
    """N(0, stddev) cut at +-cutoff * stddev, as torch's `trunc_normal_(std=s, a=-c*s, b=c*s)`
    (ModernBERT's init). Not jax's `truncated_normal`, which rescales so the cut samples have
    standard deviation `stddev`."""
    def init(key, shape, dtype=jnp.float32):
        return (stddev * jax.random.truncated_normal(key, -cutoff, cutoff, shape)).astype(dtype)
    return init


def rotary(x_BTNH: jax.Array, positions_BT: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding in the rotate-half form (GPT-NeoX, HuggingFace's
    `apply_rotary_pos_emb`): dims i and i + H/2 rotate by angle position / base^(2i/H). Computed
    in float32, returned in x's dtype. Positions come per token so that they can restart at
    every document of a packed row."""
    H = x_BTNH.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
    angles_BT1H = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    rotated = jnp.concatenate([-x[..., H // 2:], x[..., :H // 2]], axis=-1)
    return (x * jnp.cos(angles_BT1H) + rotated * jnp.sin(angles_BT1H)).astype(x_BTNH.dtype)


def window_mask(T: int, half_window: int) -> jax.Array:
    """TS bool: query t sees key s iff |t - s| <= half_window (a bidirectional sliding window of
    2 * half_window + 1 tokens, ModernBERT's local attention)."""
    t_T1, s_1S = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    return jnp.abs(t_T1 - s_1S) <= half_window


def dense(d_in, d_out, in_axes, out_axes, *, kernel_init, dtype, rngs: nnx.Rngs, axis=-1,
          use_bias: bool = True) -> nnx.LinearGeneral:
    """A LinearGeneral whose kernel (in dims..., out dims...) and bias carry logical axis names,
    contracted by `projection` (its backward laid out for XLA:CPU)."""
    in_axes, out_axes = tuple(in_axes), tuple(out_axes)
    return nnx.LinearGeneral(
        d_in, d_out, axis=axis, use_bias=use_bias, dtype=jnp.dtype(dtype),
        kernel_init=sharded(kernel_init, *in_axes, *out_axes),
        bias_init=zeros(*out_axes), dot_general=projection, rngs=rngs)


PROJECTION = "projection"  # the checkpoint name of `projection`'s outputs


def projection(x, kernel, dimension_numbers, precision=None, preferred_element_type=None,
               out_sharding=None):
    """`lax.dot_general` for a LinearGeneral, which contracts x's trailing axes with the kernel's
    leading ones (x ... I, kernel I ... O -> ... O). Same values and gradients as autodiff's;
    the kernel's gradient is written as one product over the rows of x and of the output's
    gradient, which XLA:CPU runs without first transposing a (rows, features) activation (12%
    off BERT's feed-forward block forward + backward: benchmarks/RESULTS.md)."""
    (x_axes, k_axes), batch = dimension_numbers
    n = len(k_axes)
    plain = (tuple(batch[0]) or tuple(batch[1]) or precision is not None
             or preferred_element_type is not None or out_sharding is not None
             or tuple(k_axes) != tuple(range(n)) or tuple(x_axes) != tuple(range(x.ndim - n, x.ndim)))
    if plain:
        return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type,
                                   out_sharding=out_sharding)
    # Named, so that the remat policies that keep matmul outputs keep this one too.
    return checkpoint_name(_trailing_product(x, kernel, n), PROJECTION)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _trailing_product(x, kernel, n: int):
    rows, inner = x.shape[:x.ndim - n], math.prod(kernel.shape[:n])
    out_RO = x.reshape(-1, inner) @ kernel.reshape(inner, -1)
    return out_RO.reshape(*rows, *kernel.shape[n:])


def _trailing_product_fwd(x, kernel, n):
    return _trailing_product(x, kernel, n), (x, kernel)


def _trailing_product_bwd(n, residuals, g):
    x, kernel = residuals
    inner = math.prod(kernel.shape[:n])
    x_RI, k_IO = x.reshape(-1, inner), kernel.reshape(inner, -1)
    g_RO = g.reshape(x_RI.shape[0], -1)
    dx = (g_RO @ k_IO.T).reshape(x.shape)
    dkernel = jnp.einsum("RI,RO->IO", x_RI, g_RO).reshape(kernel.shape)
    return dx, dkernel


_trailing_product.defvjp(_trailing_product_fwd, _trailing_product_bwd)


@jax.custom_vjp
def tied_logits(x_BPD: jax.Array, table_VD: jax.Array, bias_V: jax.Array) -> jax.Array:
    """float32 logits x @ table.T + bias over a vocabulary tied to the word embeddings (BPV).

    The product runs in the promoted dtype of x and the table (as `nnx.Embed.attend`). The
    backward is autodiff's, written out so that XLA:CPU runs it fast: the bias gradient as a
    product with ones (its row reduction of the BPV gradient took 60-80 ms at BERT's 640 x 30522,
    the product 3 ms), the table's as one product over the rows, which needs no transposed copy
    of that gradient (benchmarks/RESULTS.md).
    """
    return _tied_logits(x_BPD, table_VD, bias_V)


def _tied_logits(x_BPD, table_VD, bias_V):
    dtype = jnp.result_type(x_BPD, table_VD)
    logits_BPV = jnp.einsum("...D,VD->...V", x_BPD.astype(dtype), table_VD.astype(dtype))
    return logits_BPV.astype(jnp.float32) + bias_V


def _tied_logits_fwd(x_BPD, table_VD, bias_V):
    return _tied_logits(x_BPD, table_VD, bias_V), (x_BPD, table_VD, bias_V)


def _tied_logits_bwd(residuals, g_BPV):
    x_BPD, table_VD, bias_V = residuals
    dtype = jnp.result_type(x_BPD, table_VD)
    g_RV = g_BPV.reshape(-1, g_BPV.shape[-1])
    x_RD = x_BPD.reshape(-1, x_BPD.shape[-1]).astype(dtype)
    d_RV = g_RV.astype(dtype)
    dx_BPD = (d_RV @ table_VD.astype(dtype)).reshape(x_BPD.shape).astype(x_BPD.dtype)
    dtable_VD = jnp.einsum("RV,RD->VD", d_RV, x_RD).astype(table_VD.dtype)
    dbias_V = (jnp.ones(g_RV.shape[0], g_RV.dtype) @ g_RV).astype(bias_V.dtype)
    return dx_BPD, dtable_VD, dbias_V


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


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
                          key=None, implementation: str = "reference",
                          half_window: int | None = None) -> jax.Array:
    """softmax(q k / sqrt(H)) v with scores and softmax in float32 whatever `dtype`.

    `mask_BTS` (bool, broadcastable to B T S): False = query t ignores key s (padding, other
    documents of a packed row). `half_window`: a sliding window, query t sees only keys with
    |t - s| <= half_window (`window_mask`). `implementation`: one of ATTENTIONS; "xla" and
    "cudnn" are `jax.nn.dot_product_attention`'s, "reference" the einsums below (the only one
    with attention dropout: see `attention_implementation`).
    """
    dropout_active = key is not None and dropout_rate > 0
    path = attention_implementation(implementation, dtype, dropout_active)
    local_window = None
    if half_window is not None:
        if path == "xla":  # XLA's own windowed mask (both sides)
            local_window = (half_window, half_window)
        else:  # cuDNN windows only causal attention: the window joins the mask
            window_TS = window_mask(q_BTNH.shape[1], half_window)
            mask_BTS = window_TS[None] if mask_BTS is None else mask_BTS & window_TS
    mask_BNTS = None if mask_BTS is None else mask_BTS[:, None]
    if path != "reference":
        return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask_BNTS,
                                            local_window_size=local_window,
                                            implementation=path).astype(dtype)
    H = q_BTNH.shape[-1]
    scores_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH, preferred_element_type=jnp.float32)
    scores_BNTS = scores_BNTS / jnp.sqrt(H).astype(jnp.float32)
    if mask_BNTS is not None:
        scores_BNTS = jnp.where(mask_BNTS, scores_BNTS, jnp.finfo(jnp.float32).min)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1).astype(dtype)
    probs_BNTS = dropout(probs_BNTS, dropout_rate, key)
    return jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS, v_BSNH)


# ---------------------------------------------------------------------------------------------
# The transformer stack: unrolled (one module per layer) or scanned (one module whose weights
# carry a leading `layers` axis, applied with lax.scan, as MaxText does), with rematerialisation
# ---------------------------------------------------------------------------------------------

# `model.remat` names one of these. "full" keeps only each layer's input; "dots" also keeps the
# matmul outputs; "dots_no_batch" keeps only matmuls without a batch dimension (the weights'
# projections, not attention's scores), MaxText's "minimal".
# `projection`'s products are no dot to a policy (a custom_vjp): they are kept by name.
_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    "none": None,
    "full": _policies.nothing_saveable,
    "dots": _policies.save_from_both_policies(
        _policies.dots_saveable, _policies.save_only_these_names(PROJECTION)),
    "dots_no_batch": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _policies.save_only_these_names(PROJECTION)),
}


def remat_name(value) -> str:
    """A `remat` config value as a REMAT_POLICIES name; run configs from before the policies
    said true/false, which mean "full"/"none"."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {value!r}; choose one of {', '.join(REMAT_POLICIES)}")
    return value


def make_stack(make_layer, num_layers: int, rngs: nnx.Rngs, *, scan: bool):
    """`num_layers` layers from `make_layer(rngs)`: an nnx.List, or (scan) one module whose
    weights are stacked along a leading axis named `layers` (training/mesh.py shards it nowhere).
    The two draw different random inits; `stack_layers` converts one layout's weights to the other."""
    if not scan:
        return nnx.List([make_layer(rngs) for _ in range(num_layers)])

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return make_layer(rngs)
    return create(rngs)


class GroupedStack(nnx.Module):
    """The scanned layout of a stack of unlike layers that repeat as a group (ModernBERT: a global
    attention layer, then two local ones), as MaxText scans Gemma 2's local/global pairs: `head`,
    the first layers, unrolled (layers that differ from every group, e.g. one without a norm);
    then `groups`, one module per position j in the group whose weights stack that position's
    layers along a `layers` axis. One lax.scan step applies a whole group."""

    def __init__(self, head: list, groups: list):
        self.head = nnx.List(head)
        self.groups = nnx.List(groups)


def make_grouped_stack(make_layer, num_layers: int, rngs: nnx.Rngs, *, head: int, group: int,
                       scan: bool):
    """`num_layers` layers, layer i from `make_layer(i, rngs)`: an nnx.List, or (scan) a
    GroupedStack whose layers `head`, `head + group`, ... share position 0 of the group, and so
    on; `make_layer(i, ...)` must build the same structure for every i of one position.
    `stack_layers(tree, head=, group=)` converts one layout's weights to the other."""
    if not scan:
        return nnx.List([make_layer(i, rngs) for i in range(num_layers)])
    if num_layers < head or (num_layers - head) % group:
        raise ValueError(f"a scanned stack of {num_layers} layers needs {head} + a multiple of "
                         f"{group} layers; set scan_layers=false or another depth")
    count = (num_layers - head) // group
    return GroupedStack([make_layer(i, rngs) for i in range(head)],
                        [make_stack(partial(make_layer, head + j), count, rngs, scan=True)
                         for j in range(group)])


def run_stack(layers, x, *args, key, key_offset: int = 0, remat: str = "none"):
    """x -> layer_{L-1}(...layer_0(x, *args, key_0)...), key_i = fold(key, key_offset + i) in
    both layouts, so dropout (and hence the loss) is the same whichever layout holds the weights."""
    policy = REMAT_POLICIES[remat_name(remat)]
    if isinstance(layers, GroupedStack):
        head = len(layers.head)
        x = run_stack(layers.head, x, *args, key=key, key_offset=key_offset, remat=remat)
        split = [nnx.split(position) for position in layers.groups]
        group = len(split)

        def group_body(x, states_and_index):
            states, g = states_and_index
            for j, ((graphdef, _), state) in enumerate(zip(split, states)):
                index = key_offset + head + g * group + j
                x = nnx.merge(graphdef, state)(x, *args, fold(key, index))
            return x, None

        if remat_name(remat) != "none":
            group_body = jax.checkpoint(group_body, policy=policy, prevent_cse=False)
        states = tuple(state for _, state in split)
        count = jax.tree.leaves(states)[0].shape[0]
        x, _ = jax.lax.scan(group_body, x, (states, jnp.arange(count)))
        return x
    if isinstance(layers, nnx.List):
        for i, layer in enumerate(layers):
            call = type(layer).__call__
            if remat_name(remat) != "none":
                call = nnx.remat(call, policy=policy)
            x = call(layer, x, *args, fold(key, key_offset + i))
        return x

    graphdef, stacked = nnx.split(layers)

    def body(x, layer_and_index):
        state, i = layer_and_index
        return nnx.merge(graphdef, state)(x, *args, fold(key, key_offset + i)), None

    if remat_name(remat) != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)  # scan already keeps CSE apart
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    x, _ = jax.lax.scan(body, x, (stacked, jnp.arange(num_layers)))
    return x


def _is_grouped(k, v) -> bool:
    """A `layers` entry in GroupedStack's layout: {"head": {0: ...}, "groups": {0: stacked, ...}}."""
    return k == "layers" and isinstance(v, Mapping) and set(v) == {"head", "groups"}


def _grouping(tree) -> tuple[int, int] | None:
    """(head, group) of the first GroupedStack layout in `tree`, None if it has none."""
    if not isinstance(tree, Mapping):
        return None
    for k, v in tree.items():
        if _is_grouped(k, v):
            return len(v["head"]), len(v["groups"])
        if (found := _grouping(v)) is not None:
            return found
    return None


def _is_layer_index(k) -> bool:
    return isinstance(k, int) or (isinstance(k, str) and k.isdigit())  # Orbax restores '0'


def is_stacked(tree) -> bool:
    """Whether a parameter tree holds a scanned stack: a `layers` entry keyed by weight names
    (or GroupedStack's `head` and `groups`) rather than layer indices."""
    if not isinstance(tree, Mapping):  # a pure dict, or Orbax's metadata tree
        return False
    return any((k == "layers" and isinstance(v, Mapping) and v and not any(map(_is_layer_index, v)))
               or is_stacked(v) for k, v in tree.items())


def _stacked(layers: list):
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)


def stack_layers(tree, *, head: int | None = None, group: int = 1):
    """Every per-layer `layers` entry ({0: {...}, 1: {...}}) of a parameter tree as one entry of
    arrays with a leading layer axis; with `head`, in GroupedStack's layout (the first `head`
    layers apart, then one stacked entry per position in a group of `group`). A stacked tree
    stays as it is."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        if k == "layers" and isinstance(v, dict) and v and all(map(_is_layer_index, v)):
            ordered = [v[i] for i in sorted(v, key=int)]
            if head is None:
                out[k] = _stacked(ordered)
            else:
                out[k] = {"head": dict(enumerate(ordered[:head])),
                          "groups": {j: _stacked(ordered[head + j::group]) for j in range(group)}}
        else:
            out[k] = stack_layers(v, head=head, group=group)
    return out


def unstack_layers(tree):
    """The inverse of `stack_layers`: a stacked `layers` entry as {0: {...}, 1: {...}} (int keys)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        if _is_grouped(k, v):
            head = {int(i): unstack_layers(x) for i, x in v["head"].items()}
            positions = [unstack_layers({"layers": v["groups"][j]})["layers"]
                         for j in sorted(v["groups"], key=int)]
            out[k] = head | {len(head) + g * len(positions) + j: layer
                             for j, stack in enumerate(positions) for g, layer in stack.items()}
        elif k == "layers" and isinstance(v, dict) and v and not any(map(_is_layer_index, v)):
            n = jax.tree.leaves(v)[0].shape[0]
            host = jax.tree.map(np.asarray, v)  # one host copy, sliced into views
            out[k] = {i: jax.tree.map(lambda x: x[i], host) for i in range(n)}
        else:
            out[k] = unstack_layers(v)
    return out


def in_layout(tree, scanned: bool, like=None):
    """`tree`'s weights in the scanned (stacked) or unrolled (per-layer) layout; scanned as a
    GroupedStack where `like` (a tree in the wanted layout) is one."""
    if not scanned:
        return unstack_layers(tree)
    grouping = _grouping(like)
    if grouping is None:
        return stack_layers(tree)
    head, group = grouping
    return stack_layers(unstack_layers(tree), head=head, group=group)
