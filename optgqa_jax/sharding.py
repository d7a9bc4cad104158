"""Device meshes and partition rules for the parameter tree (``jax.sharding``).

Everything here builds on JAX's own distribution: a :class:`jax.sharding.Mesh` with named axes
``data`` and ``model``, one :class:`jax.sharding.PartitionSpec` per parameter leaf, and
``jax.device_put`` with :class:`jax.sharding.NamedSharding`; a jitted function on sharded
params then runs on every device of the mesh, XLA inserting the collectives.

Tensor-parallel rules (Megatron style, axis ``model`` of degree ``tp``):

* ``q_proj`` [D, N·H]: output columns split by query heads (N / tp heads per device);
* ``k_proj``, ``v_proj`` [D, K·H]: split by KV heads when tp divides K; when K < tp (and K
  divides tp) every device needs whole KV heads, so they are replicated, as vLLM does;
* ``o_proj`` [N·H, D], ``down_proj`` [F, D]: input rows split (one all-reduce after each);
* ``gate_proj``, ``up_proj`` [D, F]: output columns split;
* fused ``qkv_proj`` / ``gate_up_proj``: their column blocks are not head-aligned, so they are
  split by columns only where tp divides the width (XLA keeps the product exact with extra
  collectives); serve the unfused layout for the head-aligned plan;
* ``embed`` [V, D] and ``lm_head`` [D, V]: split by vocabulary when tp divides V, else
  replicated; norms replicated;
* quantized layers (``QuantizedLinear``): column splits split ``qweight``, ``scales`` and
  ``zeros`` by columns; row splits split ``qweight`` by packed rows and the group grids by
  groups, when whole groups and whole words fall on each device (else the layer is
  replicated); ``g_idx`` and ``perm`` are replicated.

An unequal grouping (``ModelConfig.kv_head_map``) is supported by the same rules: query heads
are split in contiguous blocks of N / tp and the KV heads follow the K-divisibility rule above;
a device's query heads may use any KV head, so with a custom map K / V are replicated unless
every block of query heads uses only its own block of KV heads.

Fully sharded data parallel (``fsdp=True``): every leaf additionally splits its largest axis
that is still whole over the ``data`` axis when the data degree divides it (parameters and,
through the same specs, optimizer state are then spread over all devices; XLA gathers them
for each use).

Pallas kernels on a tensor-parallel mesh: XLA cannot partition a Pallas call, so a program
that calls one on sharded inputs would gather them. Inside :func:`kernel_mesh` (the serving
engine's step is traced in one) the model instead runs its kernels on each device's shard
under ``jax.shard_map``: attention on the device's query and KV heads
(``optgqa_jax.attention.paged_batch_attention``), and quantized linear layers on the
device's columns, or on its rows followed by one ``psum``
(:func:`quantized_matmul_per_device`).

Axis legend: D model width, N query heads, K KV heads, H head width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from optgqa_jax.config import ModelConfig
from optgqa_jax.quant.linear import QuantizedLinear, is_quantized

DATA, MODEL = "data", "model"
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "OPTGQA_COORDINATOR", "OPTGQA_NUM_PROCESSES", "OPTGQA_PROCESS_ID")


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """Join a multi-process (multi-host) run: ``jax.distributed.initialize`` with the given
    coordinator ``host:port``, process count and this process's id, each read from
    ``OPTGQA_COORDINATOR`` / ``OPTGQA_NUM_PROCESSES`` / ``OPTGQA_PROCESS_ID`` when not given.
    Call it first, before anything touches a device; afterwards ``jax.devices()`` lists every
    process's devices and :func:`make_mesh` spans them all. On CPUs the collectives between
    processes go through gloo.

    Raises:
      ValueError: a missing or malformed setting (naming it and its environment variable).
    """
    import os

    def setting(value, env, name, kind):
        value = os.environ.get(env) if value is None else value
        if value is None or value == "":
            raise ValueError(f"{name} is not given and {env} is not set")
        if kind is int:
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name}={value!r} ({env}) must be an integer") from None
        return value

    address = setting(coordinator_address, ENV_COORDINATOR, "coordinator_address", str)
    if ":" not in address:
        raise ValueError(f"coordinator_address={address!r} must be host:port")
    n = setting(num_processes, ENV_NUM_PROCESSES, "num_processes", int)
    pid = setting(process_id, ENV_PROCESS_ID, "process_id", int)
    if n < 1 or not 0 <= pid < n:
        raise ValueError(f"process_id={pid} must lie in [0, num_processes={n})")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)


def make_mesh(data: int = 1, model: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A ``(data, model)`` mesh over the first ``data * model`` devices (default: all local
    devices in ``jax.devices()`` order).

    Raises:
      ValueError: a degree below 1, or more devices asked than present.
    """
    for name, v in (("data", data), ("model", model)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    devices = list(jax.devices() if devices is None else devices)
    if data * model > len(devices):
        raise ValueError(f"a mesh of data={data} x model={model} needs {data * model} devices; "
                         f"{len(devices)} present ({jax.default_backend()})")
    grid = np.asarray(devices[:data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError unless `cfg` can be split over `tp` devices by the rules above."""
    if isinstance(tp, bool) or not isinstance(tp, (int, np.integer)) or tp < 1:
        raise ValueError(f"tensor-parallel degree {tp!r} must be a positive integer")
    N, K = cfg.n_heads, cfg.n_kv_heads
    if N % tp:
        raise ValueError(f"tensor-parallel degree {tp} must divide the query heads "
                         f"(n_heads={N})")
    if K % tp and tp % K:
        raise ValueError(f"tensor-parallel degree {tp} divides neither the KV heads "
                         f"(n_kv_heads={K}) nor is a multiple of them (KV heads are split "
                         "when tp divides them and replicated when they divide tp)")
    if cfg.ffn_dim % tp:
        raise ValueError(f"tensor-parallel degree {tp} must divide ffn_dim={cfg.ffn_dim}")


def kv_heads_split(cfg: ModelConfig, tp: int, layer: int) -> bool:
    """Whether layer `layer`'s K / V projections are split over `tp` devices (else replicated):
    tp divides the KV heads and each device's block of query heads only uses its own block of
    KV heads."""
    K, N = cfg.n_kv_heads, cfg.n_heads
    if tp == 1 or K % tp:
        return False
    kv_map = cfg.layer_kv_head_map(layer)
    if kv_map is None:
        return True
    q_block, kv_block = N // tp, K // tp
    return all(int(kv_map[h]) // kv_block == h // q_block for h in range(N))


def _axis_if(n: int, degree: int, axis: str):
    return axis if degree > 1 and n % degree == 0 else None


def _float_spec(name: str, shape, cfg: ModelConfig, tp: int, layer: Optional[int]):
    """PartitionSpec of a float leaf by its name (see the module docstring)."""
    if len(shape) == 1:
        return P(None)
    rows, cols = shape
    col = lambda n: P(None, _axis_if(n, tp, MODEL))
    if name == "embedding":
        return P(_axis_if(rows, tp, MODEL), None)
    if name == "lm_head":
        return col(cols)
    if name in ("q_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj"):
        return col(cols)
    if name in ("k_proj", "v_proj"):
        return col(cols) if kv_heads_split(cfg, tp, layer) else P(None, None)
    if name in ("o_proj", "down_proj"):
        return P(_axis_if(rows, tp, MODEL), None)
    return P(*([None] * len(shape)))


def _layer_and_name(path) -> tuple[Optional[int], str]:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    layer = next((int(k[6:]) for k in keys if k.startswith("layer_")), None)
    named = [k for k in keys if k not in ("kernel", "scale")]
    name = keys[-1] if keys[-1] in ("embedding", "lm_head") else (named[-1] if named else "")
    if keys[-1] == "scale":
        name = "norm"
    return layer, name


def _with_fsdp(spec: P, shape, dp: int) -> P:
    """Split the largest still-whole axis of `spec` over ``data`` when dp divides it."""
    parts = list(spec) + [None] * (len(shape) - len(spec))
    if dp > 1:
        for ax in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if parts[ax] is None and shape[ax] % dp == 0:
                parts[ax] = DATA
                break
    return P(*parts)


def partition_specs(cfg: ModelConfig, params, mesh: Mesh, fsdp: bool = False):
    """One PartitionSpec per leaf of `params` (float or quantized, fused or not).

    Quantized layers map to a ``QuantizedLinear`` whose array fields are PartitionSpecs.

    Raises:
      ValueError: the mesh lacks the ``data``/``model`` axes, `cfg` cannot be split over
        the model axis (:func:`check_tensor_parallel`), or `params` hold group-sparse (BSR)
        layers or ``quant.WeightsLeftLinear`` ones, which have no partition rules.
    """
    from optgqa_jax.sparse.bsr import is_bsr
    from optgqa_jax.sparse.group_major import is_group_major
    from optgqa_jax.sparse.packed import is_packed_bsr
    from optgqa_jax.sparse.row_block import is_row_block
    sparse_leaf = lambda l: (is_bsr(l) or is_group_major(l) or is_packed_bsr(l)  # noqa: E731
                             or is_row_block(l))
    bsr = [l for l in jax.tree_util.tree_leaves(params, is_leaf=sparse_leaf) if sparse_leaf(l)]
    if bsr:
        raise ValueError(f"params hold {len(bsr)} group-sparse (BSR) layers, which cannot be "
                         "sharded yet; serve them on one device, or shard the dense pruned "
                         "params (sparse.to_dense) instead")
    from optgqa_jax.quant.weights_left import is_weights_left
    wl = [l for l in jax.tree_util.tree_leaves(params, is_leaf=is_weights_left)
          if is_weights_left(l)]
    if wl:
        raise ValueError(f"params hold {len(wl)} WeightsLeftLinear layers (a one-device "
                         "runtime layout); shard the QuantizedLinear params instead")
    if tuple(mesh.axis_names) != (DATA, MODEL):
        raise ValueError(f"mesh axes must be ({DATA!r}, {MODEL!r}) (make_mesh builds one), got "
                         f"{tuple(mesh.axis_names)}")
    tp, dp = mesh.shape[MODEL], mesh.shape[DATA]
    check_tensor_parallel(cfg, tp)
    fs = (lambda s, shape: _with_fsdp(s, shape, dp)) if fsdp else (lambda s, shape: s)

    def leaf_spec(path, leaf):
        layer, name = _layer_and_name(path)
        if is_quantized(leaf):
            return _quantized_specs(leaf, name, cfg, tp, layer, fs)
        return fs(_float_spec(name, leaf.shape, cfg, tp, layer), leaf.shape)

    return jax.tree_util.tree_map_with_path(leaf_spec, params, is_leaf=is_quantized)


def _quantized_specs(ql: QuantizedLinear, name, cfg, tp, layer, fs) -> QuantizedLinear:
    d_in, d_out = ql.shape
    if name == "embedding":  # a quantized token table is stored [D, V]: split V as the head
        name = "lm_head"
    logical = _float_spec(name, (d_in, d_out), cfg, tp, layer)
    rep = lambda a: P(*([None] * a.ndim))
    qw, grid = rep(ql.qweight), rep(ql.scales)
    if logical[1] == MODEL:                      # column split
        qw, grid = P(None, MODEL), P(None, MODEL)
    elif logical[0] == MODEL:                    # row split: whole words and groups per device
        rows, G = ql.qweight.shape[0], ql.scales.shape[0]
        if ql.groups_contiguous and ql.perm is None and rows % tp == 0:
            if ql.group_size == -1:              # one group: the grids stay whole
                qw = P(MODEL, None)
            elif G % tp == 0 and (d_in // tp) % ql.group_size == 0:
                qw, grid = P(MODEL, None), P(MODEL, None)
    return ql.replace(qweight=fs(qw, ql.qweight.shape), scales=fs(grid, ql.scales.shape),
                      zeros=fs(grid, ql.zeros.shape), g_idx=rep(ql.g_idx),
                      perm=None if ql.perm is None else rep(ql.perm))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of `mesh`."""
    return NamedSharding(mesh, P())


def kv_pages_sharding(cfg: ModelConfig, mesh: Mesh, layer: int) -> NamedSharding:
    """Placement of one layer's paged K or V pool [K, pages, page, H]: split by KV heads over
    ``model`` where the layer's K/V projections are (:func:`kv_heads_split`), else whole."""
    split = kv_heads_split(cfg, mesh.shape[MODEL], layer)
    return NamedSharding(mesh, P(MODEL if split else None))


def shardings(specs, mesh: Mesh):
    """NamedShardings for a tree of PartitionSpecs (quantized layers included)."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def shard_params(cfg: ModelConfig, params, mesh: Mesh, fsdp: bool = False):
    """`params` placed on `mesh` by :func:`partition_specs` (all checks run before any copy)."""
    specs = partition_specs(cfg, params, mesh, fsdp)
    return jax.device_put(params, shardings(specs, mesh))


def shard_batch(tokens, mesh: Mesh):
    """A [B, ...] batch split over the ``data`` axis (B must be a multiple of its degree)."""
    dp = mesh.shape[DATA]
    if tokens.shape[0] % dp:
        raise ValueError(f"batch of {tokens.shape[0]} rows does not split over data={dp}")
    return jax.device_put(tokens, NamedSharding(mesh, P(DATA, *([None] * (tokens.ndim - 1)))))


# --------------------------------------------------------------------------- kernels per device
_KERNEL_MESH: contextvars.ContextVar = contextvars.ContextVar("optgqa_kernel_mesh",
                                                              default=None)


@contextlib.contextmanager
def kernel_mesh(mesh: Optional[Mesh], specs=None):
    """Run the Pallas kernels that are traced inside this context per device on `mesh`.

    `specs` is :func:`partition_specs` of the params the traced program multiplies with
    (their quantized layers then multiply per device by those specs). A jitted function that
    enters this context while it is traced must be keyed on the mesh (the engine passes it
    as a static argument), since jit's cache does not see the context. ``mesh=None`` or a
    model axis of degree 1 changes nothing.
    """
    token = _KERNEL_MESH.set(None if mesh is None or mesh.shape[MODEL] == 1
                             else (mesh, specs))
    try:
        yield
    finally:
        _KERNEL_MESH.reset(token)


def current_kernel_mesh() -> Optional[Mesh]:
    """The mesh of the innermost :func:`kernel_mesh`, or None."""
    entry = _KERNEL_MESH.get()
    return None if entry is None else entry[0]


def _kernel_specs_at(path: Sequence[str]):
    """The PartitionSpecs recorded by :func:`kernel_mesh` for the weight at params `path`: a
    leaf (``("lm_head",)``) or a module holding a ``kernel`` (``("layer_0", "attn", "q_proj")``)."""
    entry = _KERNEL_MESH.get()
    node = None if entry is None else entry[1]
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node.get("kernel") if isinstance(node, dict) else node


def quantized_matmul_per_device(x: jax.Array, ql: QuantizedLinear, path: Sequence[str],
                                matmul) -> Optional[jax.Array]:
    """``matmul(x, ql)`` on each device's shard of `ql` under ``jax.shard_map``, or None when
    no :func:`kernel_mesh` (with specs for `path`) is active.

    Column splits take x whole and give the output split by columns; row splits take x
    split by its last axis and sum the devices' partial products with one ``psum``; layers
    the rules replicate run whole on every device.
    """
    entry = _KERNEL_MESH.get()
    specs = _kernel_specs_at(path)
    if entry is None or not isinstance(specs, QuantizedLinear):
        return None
    mesh = entry[0]
    lead = [None] * (x.ndim - 1)
    qw = tuple(specs.qweight) + (None,) * (2 - len(tuple(specs.qweight)))
    if qw[1] == MODEL:                                   # column split
        x_spec, out_spec, reduce = P(*lead, None), P(*lead, MODEL), False
    elif qw[0] == MODEL:                                 # row split: partial sums
        x_spec, out_spec, reduce = P(*lead, MODEL), P(*lead, None), True
    else:                                                # replicated
        x_spec, out_spec, reduce = P(*lead, None), P(*lead, None), False

    d_in_local = ql.shape[0] // mesh.shape[MODEL]

    def local(xx, qq):
        if reduce:   # this device's rows: contiguous groups (the rules split no others)
            rows = jnp.arange(d_in_local, dtype=jnp.int32)
            qq = qq.replace(g_idx=jnp.zeros_like(rows) if qq.group_size == -1
                            else rows // qq.group_size)
        y = matmul(xx, qq)
        return jax.lax.psum(y, MODEL) if reduce else y

    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, specs), out_specs=out_spec,
                         check_vma=False)(x, ql)
