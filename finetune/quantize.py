"""Quantisation in fine-tuning (models/quantize.py has the numerics): `method.quantize` trains
quantisation-aware, `method.quantize_after` quantises the best checkpoint post-training; either
way the run ends by scoring the int8 weights with our own eval and recording dtype and bytes.
"""

from __future__ import annotations

import jax
from flax import nnx

from models import quantize
from training.errors import UserError


def check(method) -> None:
    """One line for an unknown type, before anything is written."""
    for field in ("quantize", "quantize_after"):
        value = method.get(field, "none")
        if value != "none":
            try:
                quantize.check_qtype(value)
            except UserError as e:
                raise UserError(f"method.{field}: {e}") from None


def qat_transform(method):
    """What the step trains (training/state.py abstract_params' `transform`): with
    method.quantize, the model whose weights are fake-quantised (straight-through) in every
    forward pass, train and eval alike; None without."""
    if method.get("quantize", "none") == "none":
        return None
    return lambda model: quantize.qat_model(model, method.quantize)


def qtype(method) -> str | None:
    """The type the run's final weights are quantised to (QAT's, else the post-training one)."""
    for field in ("quantize", "quantize_after"):
        if method.get(field, "none") != "none":
            return method[field]
    return None


def post_training(model: nnx.Module, params: dict, qtype: str) -> tuple[dict, dict]:
    """(params with every weight replaced by its int8 value dequantised, what results.json
    records: dtype, float32 and quantised bytes). `model`: the float model, abstract (the
    plan's, training/state.py Abstract.model) or not; only its modules are read."""
    channels = quantize.weight_channels(model)
    host = jax.tree.map(lambda x: jax.device_get(x), params)
    quantised = quantize.quantize_params(host, channels, qtype)
    record = {"dtype": qtype, "weights": len(quantised),
              "float32_bytes": quantize.model_bytes(host),
              "bytes": quantize.model_bytes(host, quantised)}
    record["ratio"] = record["bytes"] / record["float32_bytes"]
    deq = quantize.dequantize(host, quantised)
    place = lambda d, p: jax.device_put(d, p.sharding) if isinstance(p, jax.Array) else d
    return jax.tree.map(place, deq, params), record
