"""Train state as a plain pytree, created directly in its shardings.

state = {"params": pure dict of arrays, "opt_state": optax state, "step": int32 scalar}.
Shardings come from `eval_shape` and the logical axis names on the model's weights, so no
process ever holds an unsharded copy of the parameters.
"""

from typing import Callable

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


def create_train_state(model_fn, tx, mesh, seed: int, params: dict | None = None):
    """Returns (state, shardings, graphdef). `params` (host or device) replaces the random init."""
    graphdef, specs = graphdef_and_specs(model_fn)
    param_shardings = shardings_of(specs, mesh)

    def init(params):
        if params is None:
            params = init_params(model_fn, seed)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    abstract = jax.eval_shape(init, params)
    shardings = state_shardings(abstract, param_shardings, tx, mesh)
    if params is not None:
        params = jax.device_put(params, param_shardings)
    state = jax.jit(init, out_shardings=shardings)(params)
    return state, shardings, graphdef


def abstract_state(model_fn, tx, mesh):
    """ShapeDtypeStructs with shardings: the restore target for a checkpoint on this mesh."""
    graphdef, specs = graphdef_and_specs(model_fn)
    init = lambda: {"params": (p := init_params(model_fn, 0)), "opt_state": tx.init(p),
                    "step": jnp.zeros((), jnp.int32)}
    abstract = jax.eval_shape(init)
    shardings = state_shardings(abstract, shardings_of(specs, mesh), tx, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings), shardings, graphdef
