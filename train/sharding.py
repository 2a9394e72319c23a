"""The device mesh and the logical -> physical axis rules.

Model code names axes logically (`batch, length, embed, heads, kv_heads, head_dim, mlp, vocab,
layers`); the config maps them onto the mesh axes `data`, `fsdp`, `tensor`. Changing parallelism
is a config change:

    mesh:  {data: -1, fsdp: 1, tensor: 1}          # pure data parallel (-1 = the rest)
    rules: [[batch, [data, fsdp]], [embed, fsdp], [heads, tensor], ...]
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hibari.base.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)

log = logging.getLogger(__name__)


class MeshError(UserError, ValueError):
    """The mesh config does not fit the devices or the batch."""


def mesh_shape(sizes: dict[str, int], n_devices: int) -> dict[str, int]:
    """Resolve the mesh sizes (one may be -1 = the rest) against the device count."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"config.mesh: unknown axes {unknown}; the axes are {MESH_AXES}")
    shape = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in shape.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in shape.values()):
        raise MeshError(f"config.mesh={shape}: sizes must be positive, with at most one -1")
    fixed = math.prod(s for s in shape.values() if s != -1)
    if free:
        if n_devices % fixed:
            raise MeshError(f"config.mesh={shape}: {n_devices} devices are not divisible by "
                            f"the fixed axes' product {fixed}")
        shape[free[0]] = n_devices // fixed
    if math.prod(shape.values()) != n_devices:
        raise MeshError(f"config.mesh={shape} uses {math.prod(shape.values())} devices but "
                        f"{n_devices} are present; set one axis to -1 or fix the sizes")
    return shape


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over all (global) devices with Auto axis types (sharding propagated by XLA)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(dict(sizes), len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(dims), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def normalize_rules(rules: Iterable[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """Rules from a config (lists from JSON/ml_collections) as hashable tuples, validated."""
    out = []
    for i, rule in enumerate(rules):
        if len(rule) != 2:
            raise MeshError(f"config.rules[{i}]={rule!r}: each rule is [logical_axis, mesh_axes]")
        logical, physical = rule
        if isinstance(physical, (list, tuple)):
            physical = tuple(physical)
            axes = physical
        else:
            axes = () if physical is None else (physical,)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise MeshError(f"config.rules[{i}]: unknown mesh axes {bad} for {logical!r}; the "
                            f"mesh axes are {MESH_AXES}")
        out.append((str(logical), physical))
    return tuple(out)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop mesh axes that do not divide a dimension (that dimension is then replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        size = math.prod(mesh.shape[a] for a in names)
        if names and dim % size:
            log.warning("dimension of size %d is not divisible by mesh axes %s (%d); "
                        "replicating it", dim, names, size)
            fitted.append(None)
        else:
            fitted.append(axes)
    return P(*fitted)


def logical_shardings(logical_specs, shapes, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs and matching shapes."""
    physical = nn.logical_to_mesh(logical_specs, rules)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
        physical, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Sharding of batch arrays [b, t, ...]: batch by the rules, the rest replicated."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def batch_divisor(mesh: Mesh, rules) -> int:
    """How many ways the batch dimension is split."""
    axes = batch_sharding(mesh, rules).spec[0]
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    return math.prod(mesh.shape[a] for a in names)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules):
    """Activate the mesh and rules so the model's logical activation constraints apply.

    Entered inside a jitted function's body, it affects only that trace."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
    """Assemble each host's rows [b_local, ...] into global arrays [b, ...] on the mesh."""
    out = {}
    for name, x in local.items():
        sharding = batch_sharding(mesh, rules, np.ndim(x))
        shape = (x.shape[0] * jax.process_count(),) + tuple(x.shape[1:])
        out[name] = jax.make_array_from_process_local_data(sharding, x, shape)
    return out
