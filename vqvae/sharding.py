"""The one place that names mesh axes: a data-parallel mesh, batch and state shardings.

Batches are split over the ``data`` axis. State is replicated (pure data parallelism) or,
with ``fsdp=True``, each large array is split over the same axis along its largest divisible
dimension (FSDP-style: parameters and optimizer state take 1/n of the memory each, and the
compiler gathers them where they are used). The mesh uses Auto axes, so un-annotated model
code runs unchanged and reductions over the batch are global.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqvae.errors import InvalidValueError

DATA = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all by default)."""
    available = jax.device_count()
    if num_devices and num_devices > available:
        raise InvalidValueError(
            f"num_devices={num_devices}, but only {available} device(s) are visible "
            f"({jax.devices()[0].platform}); use at most {available}, or 0 for all"
        )
    devices = jax.devices()[: num_devices or available]
    return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
    n = mesh.shape[DATA]
    if batch_size % n:
        raise InvalidValueError(
            f"{name} {batch_size} is not divisible by the {n} devices of the mesh; "
            f"use a multiple of {n}"
        )


def _fsdp_spec(shape: tuple[int, ...], n: int, min_size: int) -> P:
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            return P(*[DATA if a == axis else None for a in range(len(shape))])
    return P()


def state_shardings(abstract_state, mesh: Mesh, fsdp: bool = False, min_size: int = 2**14):
    """A NamedSharding for every array leaf of ``abstract_state`` (shapes only are read)."""
    n = mesh.shape[DATA]

    def spec(leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, _fsdp_spec(shape, n, min_size) if fsdp else P())

    return jax.tree.map(spec, abstract_state)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order, as NumPy."""
    shards = {}
    for shard in x.addressable_shards:  # replicas of the same rows appear once
        shards.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
