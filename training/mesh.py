"""The device mesh and the one table that maps logical axis names onto it."""

import math

import jax
import numpy as np
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from training.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Every logical name the models use, and where it lives. Weights shard their `embed` dimension
# over fsdp (ZeRO-3 style: gathered per layer by XLA) and heads/mlp/vocab over tensor
# (Megatron style); activations shard their batch over data x fsdp and never name `embed`.
RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("patch", None),
    ("layers", None),  # a scanned stack's layer axis: each device holds every layer's shard
)


def logical_rules():
    """The context in which model code's logical axis names resolve through RULES."""
    return spmd.logical_axis_rules(RULES)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolve one -1 to the remaining devices; the product must equal the device count."""
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise UserError(f"mesh {tuple(shape)}: at most one of mesh.data/fsdp/tensor may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if known <= 0 or num_devices % known:
            raise UserError(f"mesh {tuple(shape)} does not divide {num_devices} devices; "
                            f"set mesh.data/fsdp/tensor so their product is {num_devices}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices or min(shape) < 1:
        raise UserError(f"mesh {tuple(shape)} needs {math.prod(shape)} devices but there are "
                        f"{num_devices}; set mesh.data/fsdp/tensor so their product is {num_devices}")
    return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, len(devices))
    # Auto axes: under the Explicit default the embedding gather raises a ShardingTypeError.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def logical_to_mesh(spec: P) -> P:
    return spmd.apply_rules(spec, RULES)


def shardings_of(logical_specs, mesh: Mesh):
    """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh(s)), logical_specs,
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh(P("batch")))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble the global batch from this process's rows (its share of the batch axis)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def to_host(x) -> np.ndarray:
    """A global array as numpy on every process (gathered across processes when needed)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_divisible(batch_size: int, mesh: Mesh, what: str = "train.batch_size",
                    grad_accum: int = 1) -> None:
    """The batch must split into `grad_accum` microbatches, each divisible over data x fsdp."""
    dp = data_parallel_size(mesh)
    if batch_size % dp:
        raise UserError(f"{what}={batch_size} is not divisible by the data-parallel size {dp} "
                        f"(mesh.data x mesh.fsdp); use a multiple of {dp}")
    if batch_size % (grad_accum * dp):
        raise UserError(f"{what}={batch_size} must divide into train.grad_accum={grad_accum} "
                        f"microbatches of a multiple of the data-parallel size {dp}")
