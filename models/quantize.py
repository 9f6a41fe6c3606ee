"""Integer weight quantisation through qwix: which weights, on which channels, and what they weigh.

Weights are quantised symmetrically, one absmax scale per output channel (qwix's `absmax`
calibration, scale = max|w| / 127.5 for int8), and weight-only: activations stay in the compute
dtype. Two ways in, one numerics:

- quantisation-aware training: `qat_model` runs the model under qwix's `QtProvider`, which
  fake-quantises every weight that meets a `jax.lax.dot_general` (straight-through gradients);
- post-training: `quantize_params` quantises a params tree with `qwix.quantize` on the channel
  axes `weight_channels` reads off the modules, and `dequantize` gives the float weights that a
  weight-only int8 matmul computes with (what our eval and a transformers export read).

Embedding tables are quantised per row (per token) post-training only: a lookup is a gather,
which qwix does not intercept, so quantisation-aware training leaves them in float.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from infra.errors import UserError
from models import layers

QTYPES = {"int8": jnp.int8}  # what `method.quantize` and `models.hf quantize --dtype` accept


def check_qtype(name: str) -> str:
    """`name` if it is a quantisation type we support, else one line saying which are."""
    if name not in QTYPES:
        raise UserError(f"unknown quantisation type {name!r}; choose one of: {', '.join(QTYPES)}")
    return name


def qat_model(model: nnx.Module, qtype: str) -> nnx.Module:
    """`model` whose `__call__` fake-quantises every weight of a dot_general (qwix QtProvider).

    Our dense layers contract through `layers.projection`, a custom_vjp over a reshaped matmul
    (faster on XLA:CPU) in which qwix cannot find the kernel parameter: the quantised model's
    layers call `jax.lax.dot_general` itself, which qwix intercepts. The params are unchanged
    (no new variables for weight-only quantisation), so checkpoints stay ordinary float ones.
    `model` itself is left as it was (an abstract one too: training/state.py abstract_params)."""
    model = nnx.clone(model)
    use_lax_dot_general(model)
    # dot_general only: attention's einsums multiply activations, which stay in float. The
    # backward pass reuses the quantised weights (qwix's default with a float backward is the
    # float ones), so the gradient is exactly straight-through: d loss(Q(W)) / dW = loss'(Q(W)).
    rules = [qwix.QtRule(module_path=".*", op_names=("dot_general",),
                         weight_qtype=QTYPES[check_qtype(qtype)],
                         additional_qt_config={"use_original_residuals": False})]
    # No example call: weight-only fake quantisation creates no state (skip_nnx_init).
    return qwix.quantize_model(model, qwix.QtProvider(rules), skip_nnx_init=True)


def use_lax_dot_general(model: nnx.Module) -> None:
    """Point every dense layer of `model` at `jax.lax.dot_general`, the op qwix intercepts."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.LinearGeneral) and module.dot_general is layers.projection:
            module.dot_general = jax.lax.dot_general


def weight_channels(model: nnx.Module) -> dict[tuple, tuple[tuple[int, ...], int]]:
    """The params path (as in `nnx.to_pure_dict`, keys as strings) of every weight to quantise
    -> (its channel axes, one scale per index along them; the weight's rank): a dense kernel's
    output axes, an embedding's rows. Biases, norms and the other params stay float."""
    channels = {}
    for path, module in nnx.iter_modules(model):
        path = tuple(str(k) for k in path)
        if isinstance(module, nnx.LinearGeneral):  # kernel: (in dims..., out dims...)
            ndim = len(module.in_features) + len(module.out_features)
            channels[(*path, "kernel")] = (tuple(range(len(module.in_features), ndim)), ndim)
        elif isinstance(module, nnx.Linear):
            channels[(*path, "kernel")] = ((1,), 2)
        elif isinstance(module, nnx.Conv):  # kernel: (window..., in, out)
            ndim = len(module.kernel_size) + 2
            channels[(*path, "kernel")] = ((ndim - 1,), ndim)
        elif isinstance(module, nnx.Embed):
            channels[(*path, "embedding")] = ((0,), 2)
    return channels


def _flat(params: dict) -> dict:
    return {tuple(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def quantize_params(params: dict, channels: dict, qtype: str) -> dict:
    """params path -> qwix QArray (qvalue, scale) for every weight `channels` names. A scanned
    stack's weights carry a leading layers axis: each layer then has its own scales."""
    qt = QTYPES[check_qtype(qtype)]
    quantised = {}
    for path, leaf in _flat(params).items():
        if path not in channels:
            continue
        axes, ndim = channels[path]
        lead = leaf.ndim - ndim  # a scanned stack's layers axis
        quantised[path] = qwix.quantize(jnp.asarray(leaf), qt, channelwise_axes=(
            *range(lead), *(a + lead for a in axes)))
    return quantised


def dequantize(params: dict, quantised: dict) -> dict:
    """`params` with every quantised weight replaced by its dequantised float value."""
    def swap(path, leaf):
        q = quantised.get(tuple(str(k.key) for k in path))
        return leaf if q is None else qwix.dequantize(q).astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(swap, params)


def model_bytes(params: dict, quantised: dict | None = None) -> int:
    """Bytes of the weights as stored: quantised ones as their integers plus float32 scales,
    the rest at their own dtype."""
    total = 0
    for path, leaf in _flat(params).items():
        q = (quantised or {}).get(path)
        if q is None:
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        else:
            total += math.prod(q.qvalue.shape) * np.dtype(q.qvalue.dtype).itemsize
            total += math.prod(q.scale.shape) * 4
    return total


def quantize_rows(array: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A HuggingFace weight (out, in...) or embedding table (rows, dims) as (integers, float32
    scales of shape (out, 1...), the dequantised float32 weight): one scale per output channel,
    as `quantize_params` gives the same weight in our layout."""
    q = qwix.quantize(jnp.asarray(array, jnp.float32), QTYPES[check_qtype(qtype)], channelwise_axes=(0,))
    return np.asarray(q.qvalue), np.asarray(q.scale, np.float32), np.asarray(qwix.dequantize(q))


class HfQuantizer:
    """The hooks of `models.hf.export_params` for a quantised export: every weight matrix and
    embedding table (a 2-D or larger `*.weight`) is written dequantised to model.safetensors,
    which transformers loads as it is, and as integers with its scales (`NAME.scale`, float32,
    one per output channel) beside the float tensors left as they were (biases, norms, fixed
    tables) to model.int8.safetensors; quantization.json says how and what each weighs."""

    def __init__(self, qtype: str):
        self.qtype = check_qtype(qtype)
        self.tensors: dict[str, np.ndarray] = {}
        self.float32_bytes = 0

    def transform(self, name: str, array: np.ndarray) -> np.ndarray:
        self.float32_bytes += array.size * 4
        if array.ndim < 2 or not name.endswith("weight") or not np.issubdtype(array.dtype, np.floating):
            self.tensors[name] = np.asarray(array, np.float32)
            return array
        self.tensors[name], self.tensors[f"{name}.scale"], dequantised = quantize_rows(array, self.qtype)
        return dequantised.astype(array.dtype)

    @property
    def bytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())

    def write_more(self, folder) -> None:
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in self.tensors.items()},
                  str(folder / "model.int8.safetensors"), metadata={"format": "pretrax-int8"})
        summary = {"dtype": self.qtype, "scheme": "symmetric absmax, one float32 scale per output "
                   "channel (row); weight = integers * scale", "library": f"qwix {qwix.__version__}",
                   "weights": sum(k.endswith(".scale") for k in self.tensors),
                   "float32_bytes": self.float32_bytes, "bytes": self.bytes,
                   "ratio": self.bytes / self.float32_bytes}
        (folder / "quantization.json").write_text(json.dumps(summary, indent=1) + "\n")
