"""Train state as a plain pytree, created directly in its shardings.

state = {"params": pure dict of arrays, "opt_state": optax state, "step": int32 scalar}.
Shardings come from `eval_shape` and the logical axis names on the model's weights, so no
process ever holds an unsharded copy of the parameters.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from training.mesh import shardings_of


def abstract_model(model_fn: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))


def graphdef_and_specs(model_fn):
    """The model's graph definition and a pure dict of its parameters' logical PartitionSpecs."""
    graphdef, params = nnx.split(abstract_model(model_fn), nnx.Param)
    return graphdef, nnx.to_pure_dict(nnx.get_partition_spec(params))


def init_params(model_fn, seed: int) -> dict:
    with nnx.use_eager_sharding(False):
        model = model_fn(nnx.Rngs(params=seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def state_shardings(abstract_state, param_shardings, tx: optax.GradientTransformation, mesh):
    """Optimizer moments follow their parameters; counters and the step are replicated.

    Masked optimizers (`optax.multi_transform`, `optax.masked`) hold a `MaskedNode` (no array)
    where a parameter has no state, e.g. a frozen one; it stays as it is."""
    replicated = NamedSharding(mesh, P())
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt = optax.tree_map_params(
        tx, lambda state, sharding: state if masked(state) else sharding, abstract_state["opt_state"],
        param_shardings, transform_non_params=lambda _: replicated, is_leaf=masked)
    return {"params": param_shardings, "opt_state": opt, "step": replicated}


@dataclasses.dataclass
class StatePlan:
    """What a start knows before any weight exists, from one abstract trace of the model: its
    graph definition, the train state's ShapeDtypeStructs (with shardings: a checkpoint's restore
    target) and those shardings. `params` is the parameters' abstract tree (frozen masks, layer
    scales). Tracing the model again for each of these is what a start would otherwise repeat."""
    graphdef: Any
    target: dict
    shardings: dict

    @property
    def params(self) -> dict:
        return self.target["params"]


class Abstract(NamedTuple):
    """The model traced once, abstractly: the graph definition the step runs, the parameters'
    ShapeDtypeStructs and logical PartitionSpecs, and the traced model itself (the float one
    where a transform gave the step another graph: what reads weights off the modules, such as
    post-training quantisation, and an eval of the plain model take it from here)."""
    graphdef: Any
    params: dict
    specs: dict
    model: nnx.Module


def abstract_params(model_fn, transform: Callable[[nnx.Module], nnx.Module] | None = None) -> Abstract:
    """The model traced once, abstractly. `transform(model)` gives the model the step runs from
    the traced one, on the same parameters (quantisation-aware training: the same weights under
    another graph); it is applied to the abstract model, which is not traced again."""
    model = abstract_model(model_fn)
    graphdef, params = nnx.split(model if transform is None else transform(model), nnx.Param)
    return Abstract(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params)),
                    nnx.to_pure_dict(nnx.get_partition_spec(params)), model)


def plan_state(abstract: Abstract, tx, mesh) -> StatePlan:
    """The train state's plan from `abstract_params(model_fn)`; only the optimizer is traced."""
    abstract_state = {"params": abstract.params, "opt_state": jax.eval_shape(tx.init, abstract.params),
                      "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = state_shardings(abstract_state, shardings_of(abstract.specs, mesh), tx, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    return StatePlan(abstract.graphdef, target, shardings)


def create_train_state(model_fn, tx, mesh, seed: int, params: dict | None = None,
                       plan: StatePlan | None = None):
    """Returns (state, shardings, graphdef). `params` (host or device) replaces the random init,
    and then the model is not built again; `plan` (plan_state's) saves tracing it abstractly."""
    plan = plan or plan_state(abstract_params(model_fn), tx, mesh)

    def init(params):
        if params is None:
            params = init_params(model_fn, seed)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    if params is not None:
        params = jax.device_put(params, plan.shardings["params"])
    state = jax.jit(init, out_shardings=plan.shardings)(params)
    return state, plan.shardings, plan.graphdef


def abstract_state(model_fn, tx, mesh):
    """(the restore target, its shardings, the graph definition); see plan_state."""
    plan = plan_state(abstract_params(model_fn), tx, mesh)
    return plan.target, plan.shardings, plan.graphdef
