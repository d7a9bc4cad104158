"""Save and restore (config, params) with orbax-checkpoint, float or quantized.

Layout of a checkpoint directory::

    path/
      optgqa_config.json   # ModelConfig.to_json()
      params/              # orbax StandardCheckpointer tree
      quantization.json    # only when some kernel is quantized or a QuantConfig was given

A ``QuantizedLinear`` leaf is stored in orbax as the plain dict ``{qweight, scales,
zeros, g_idx}`` of its arrays; its static fields go to ``quantization.json``::

    {"format_version": 1,
     "quant_config": {...} or null,            # QuantConfig.to_dict()
     "layers": {"layer_0/attn/q_proj/kernel":  # "/"-joined path of the leaf
                {"bits": 4, "group_size": 128, "sym": true, "dtype": "bfloat16",
                 "scale_dtype": "float16"}, ...}}

A group-sparse ``optgqa_jax.sparse.BSRQuantizedLinear`` leaf is stored as
``{codes, scales, zeros, col_idx, row_ptr}`` with ``"format": "bsr"`` and its ``nnz`` (number of
stored groups) in the layer's metadata.

On load the abstract target (shapes and dtypes of every array) is built from that
metadata and the config's logical shapes, so the arrays are restored bit-exactly and a
checkpoint that does not fit its config fails with a ValueError. Either layout (unfused
or ``optgqa_jax.fused``) is saved as given and restored the same way.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import flax.traverse_util
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from optgqa_jax.config import ModelConfig
from optgqa_jax.fused import is_fused
from optgqa_jax.model import abstract_params, check_params_match
from optgqa_jax.quant.config import QuantConfig
from optgqa_jax.quant.linear import (QuantizedLinear, contiguous_groups, is_quantized,
                                     unsort_groups)
from optgqa_jax.quant.packing import packed_rows

CONFIG_FILE = "optgqa_config.json"
PARAMS_DIR = "params"
QUANT_FILE = "quantization.json"
EMBEDDING = "embed/embedding"  # the token table's path in the flattened params
QUANT_FORMAT_VERSION = 1
_ARRAYS = ("qweight", "scales", "zeros", "g_idx")
_BSR_ARRAYS = ("codes", "scales", "zeros", "col_idx", "row_ptr")
_STATIC = ("bits", "group_size", "sym", "dtype", "scale_dtype")


# ----------------------------------------------------------------------------- quantized leaves
def _layer_metadata(ql: QuantizedLinear) -> dict:
    return {"bits": ql.bits, "group_size": ql.group_size, "sym": ql.sym, "dtype": ql.dtype,
            "scale_dtype": jnp.dtype(ql.scales.dtype).name,
            "groups_contiguous": ql.groups_contiguous}


def _bsr_metadata(b) -> dict:
    return {"format": "bsr", "bits": b.bits, "group_size": b.group_size, "sym": b.sym,
            "dtype": b.dtype, "scale_dtype": jnp.dtype(b.scales.dtype).name, "nnz": b.nnz}


def _stored_shapes(meta: dict, shape: tuple[int, int], name: str) -> dict:
    """ShapeDtypeStructs of the arrays of a quantized kernel of logical `shape` [D_in, D_out]."""
    d_in, d_out = shape
    if meta.get("format") == "bsr":
        gs, bits, nnz = meta["group_size"], meta["bits"], meta.get("nnz")
        if (not isinstance(nnz, int) or nnz < 0 or not isinstance(gs, int) or gs < 1
                or d_in % gs or (gs * bits) % 32):
            raise ValueError(f"{QUANT_FILE}: {name}: BSR metadata (nnz={nnz!r}, group_size="
                             f"{gs!r}, bits={bits!r}) does not fit D_in={d_in}")
        return {"codes": jax.ShapeDtypeStruct((nnz, gs * bits // 32), jnp.int32),
                "scales": jax.ShapeDtypeStruct((nnz,), jnp.dtype(meta["scale_dtype"])),
                "zeros": jax.ShapeDtypeStruct((nnz,), jnp.uint8),
                "col_idx": jax.ShapeDtypeStruct((nnz,), jnp.int32),
                "row_ptr": jax.ShapeDtypeStruct((d_out + 1,), jnp.int32)}
    try:
        qc = QuantConfig(bits=meta["bits"], group_size=meta["group_size"],
                         scale_dtype=meta["scale_dtype"])
        qc.check_layer(d_in, name)
        rows = packed_rows(d_in, qc.bits)
    except ValueError as e:
        raise ValueError(f"{QUANT_FILE}: {name}: {e}") from e
    G = qc.groups(d_in)
    return {"qweight": jax.ShapeDtypeStruct((rows, d_out), jnp.int32),
            "scales": jax.ShapeDtypeStruct((G, d_out), jnp.dtype(qc.scale_dtype)),
            "zeros": jax.ShapeDtypeStruct((G, d_out), jnp.uint8),
            "g_idx": jax.ShapeDtypeStruct((d_in,), jnp.int32)}


def _check_stored(name: str, ql: QuantizedLinear) -> None:
    """Raise ValueError when the arrays of `ql` are not what its static fields promise."""
    expected = _stored_shapes(_layer_metadata(ql), ql.shape, name)
    for key, want in expected.items():
        got = getattr(ql, key)
        if tuple(got.shape) != want.shape or jnp.dtype(got.dtype) != want.dtype:
            raise ValueError(f"{name}.{key}: {got.dtype}{list(got.shape)}, its bits/group_size "
                             f"imply {want.dtype}{list(want.shape)}")


def _check_quant_config(layers: dict, qc: Optional[QuantConfig]) -> None:
    """Raise ValueError when `qc` contradicts the metadata of a quantized layer."""
    if qc is None:
        return
    for name, meta in layers.items():
        diffs = [f"{k}={meta[k]!r} (QuantConfig has {getattr(qc, k)!r})"
                 for k in ("bits", "group_size", "sym", "scale_dtype")
                 if meta[k] != getattr(qc, k)]
        if diffs:
            raise ValueError(f"{name} contradicts the QuantConfig: " + ", ".join(diffs))
    if layers and ("lm_head" in layers) != qc.quantize_lm_head:
        raise ValueError(f"the LM head is {'' if 'lm_head' in layers else 'not '}quantized "
                         f"but the QuantConfig has quantize_lm_head={qc.quantize_lm_head}")
    if layers and (EMBEDDING in layers) != qc.quantize_embedding:
        raise ValueError(f"the token table is {'' if EMBEDDING in layers else 'not '}quantized "
                         f"but the QuantConfig has quantize_embedding={qc.quantize_embedding}")


def _read_quant_file(path: str) -> Optional[dict]:
    """The parsed ``quantization.json`` of checkpoint `path` (None when absent), validated."""
    file = os.path.join(path, QUANT_FILE)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            raw = json.load(f)
        if raw.get("format_version") != QUANT_FORMAT_VERSION:
            raise ValueError(f"format_version {raw.get('format_version')!r}, this reader "
                             f"knows {QUANT_FORMAT_VERSION}")
        qc = None if raw.get("quant_config") is None else QuantConfig.from_dict(raw["quant_config"])
        layers = raw["layers"]
        for name, meta in layers.items():
            missing = [k for k in _STATIC if k not in meta]
            if missing:
                raise ValueError(f"layer {name!r} lacks {missing}")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{file!r} could not be read: {e}") from e
    _check_quant_config(layers, qc)
    return {"quant_config": qc, "layers": layers}


# ----------------------------------------------------------------------------- public API
def save_checkpoint(path: str, cfg: ModelConfig, params: dict, *, overwrite: bool = False,
                    quant_config: Optional[QuantConfig] = None) -> str:
    """Write `cfg` and `params` to the directory `path` (created; must not exist unless `overwrite`).

    Args:
      path: checkpoint directory.
      cfg: the model configuration.
      params: float or quantized params (any mix of float and ``QuantizedLinear``
        kernels, LM head included), unfused or fused layout.
      overwrite: replace an existing checkpoint.
      quant_config: the settings the params were quantized with, stored for
        :func:`load_quant_config`; must agree with every quantized layer.

    Returns:
      The absolute checkpoint path.

    Raises:
      FileExistsError: `path` exists and `overwrite` is false.
      ValueError: `params` do not match `cfg`, a quantized layer's arrays do not fit its
        bits/group size, or `quant_config` contradicts a quantized layer.
    """
    path = os.path.abspath(path)
    check_params_match(cfg, params, what="params")
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    layers = {}
    from optgqa_jax.sparse.bsr import check_bsr, is_bsr
    from optgqa_jax.sparse.group_major import is_group_major
    from optgqa_jax.sparse.packed import is_packed_bsr
    from optgqa_jax.sparse.row_block import is_row_block
    from optgqa_jax.quant.weights_left import is_weights_left
    for name, leaf in list(flat.items()):
        if is_weights_left(leaf):
            raise ValueError(f"{name} is a WeightsLeftLinear, a runtime layout that checkpoints "
                             "do not store: save the QuantizedLinear params and convert them "
                             "after loading (quant.to_weights_left_params)")
        if is_group_major(leaf):
            raise ValueError(f"{name} is a GroupMajorLinear, a runtime layout that checkpoints "
                             "do not store: save the BSR params and convert them after loading "
                             "(sparse.to_group_major_params)")
        if is_packed_bsr(leaf):
            raise ValueError(f"{name} is a PackedBSRLinear, a runtime layout that checkpoints "
                             "do not store: save the BSR params and convert them after loading "
                             "(sparse.to_packed_bsr_params)")
        if is_row_block(leaf):
            raise ValueError(f"{name} is a RowBlockQuantizedLinear, a runtime layout that "
                             "checkpoints do not store: save the BSR params and convert them "
                             "after loading (sparse.to_row_block_params)")
        if is_bsr(leaf):
            check_bsr(leaf, name)
            layers[name] = _bsr_metadata(leaf)
            del flat[name]
            flat.update({f"{name}/{key}": getattr(leaf, key) for key in _BSR_ARRAYS})
        elif is_quantized(leaf):
            leaf = unsort_groups(leaf)  # files hold rows in logical order
            _check_stored(name, leaf)
            layers[name] = _layer_metadata(leaf)
            del flat[name]
            flat.update({f"{name}/{key}": getattr(leaf, key) for key in _ARRAYS})
    _check_quant_config(layers, quant_config)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"checkpoint path {path!r} already exists; pass overwrite=True")
    os.makedirs(path, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, PARAMS_DIR),
                      flax.traverse_util.unflatten_dict(flat, sep="/"), force=overwrite)
    checkpointer.wait_until_finished()
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        f.write(cfg.to_json())
    quant_file = os.path.join(path, QUANT_FILE)
    if layers or quant_config is not None:
        record = {"format_version": QUANT_FORMAT_VERSION,
                  "quant_config": None if quant_config is None else quant_config.to_dict(),
                  "layers": layers}
        with open(quant_file, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
    elif os.path.exists(quant_file):  # overwriting a quantized checkpoint with float params
        os.remove(quant_file)
    return path


def is_checkpoint(path: str) -> bool:
    """Whether `path` is a directory written by :func:`save_checkpoint`."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def load_quant_config(path: str) -> Optional[QuantConfig]:
    """The QuantConfig saved with checkpoint `path`, or None (float checkpoint, or none given).

    Raises:
      ValueError: an unreadable ``quantization.json``, or one whose QuantConfig
        contradicts a layer's metadata.
    """
    record = _read_quant_file(os.path.abspath(path))
    return None if record is None else record["quant_config"]


def _stored_arrays(params_path: str) -> dict:
    """{"/"-joined path: orbax ArrayMetadata (shape, dtype)} of the stored params tree."""
    meta = ocp.StandardCheckpointer().metadata(params_path)
    tree = getattr(meta, "item_metadata", meta)  # a StepMetadata in orbax >= 0.11
    return flax.traverse_util.flatten_dict(dict(getattr(tree, "tree", tree)), sep="/")


def _check_stored_arrays(stored: dict, target: dict, params_path: str) -> None:
    """Compare shapes and dtypes before restoring: orbax would cast a dtype silently."""
    problems = [f"{k}: missing" for k in sorted(set(target) - set(stored))]
    problems += [f"{k}: stored but not expected" for k in sorted(set(stored) - set(target))]
    for k in sorted(set(stored) & set(target)):
        got, want = stored[k], target[k]
        if tuple(got.shape) != tuple(want.shape) or jnp.dtype(got.dtype) != jnp.dtype(want.dtype):
            problems.append(f"{k}: stored {jnp.dtype(got.dtype)}{list(got.shape)}, expected "
                            f"{jnp.dtype(want.dtype)}{list(want.shape)}")
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise ValueError(f"checkpoint arrays in {params_path!r} do not fit its config and "
                         f"{QUANT_FILE}:\n  {shown}{more}")


def load_checkpoint(path: str, cfg: Optional[ModelConfig] = None) -> tuple[ModelConfig, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`; arrays are restored bit-exactly.

    Args:
      path: checkpoint directory.
      cfg: optional expected config. If given, the saved config must equal it;
        a mismatch raises ValueError listing the differing fields.

    Returns:
      (config, params), quantized kernels as ``QuantizedLinear`` (or, group-sparse,
      ``BSRQuantizedLinear``) leaves, in the layout saved.

    Raises:
      FileNotFoundError: `path` or its config/params are missing.
      ValueError: unreadable config or ``quantization.json``, config mismatch, quantization
        metadata that contradicts itself or the config, or stored arrays that do not fit.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path!r} is not an optgqa checkpoint: {CONFIG_FILE} is missing")
    try:
        with open(config_path) as f:
            saved = ModelConfig.from_dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"checkpoint config {config_path!r} could not be read: {e}") from e
    if cfg is not None and cfg != saved:
        diffs = [f"{k}: checkpoint has {v!r}, requested {cfg.to_dict()[k]!r}"
                 for k, v in saved.to_dict().items() if cfg.to_dict()[k] != v]
        raise ValueError("checkpoint config does not match the requested config:\n  "
                         + "\n  ".join(diffs))
    params_path = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_path):
        raise FileNotFoundError(f"checkpoint {path!r} has no {PARAMS_DIR}/ directory")
    record = _read_quant_file(path)
    layers = {} if record is None else record["layers"]
    stored = _stored_arrays(params_path)
    fused = is_fused(flax.traverse_util.unflatten_dict(stored, sep="/"))
    flat = {name: jax.ShapeDtypeStruct(s.shape, s.dtype) for name, s in
            flax.traverse_util.flatten_dict(abstract_params(saved, fused), sep="/").items()}
    meta_shapes = {}
    for name, meta in layers.items():
        if name not in flat or len(flat[name].shape) != 2:
            raise ValueError(f"{QUANT_FILE} names {name!r}, which is not a linear kernel of "
                             f"this config ({'fused' if fused else 'unfused'} layout)")
        if jnp.dtype(meta["dtype"]) != jnp.dtype(flat[name].dtype):
            raise ValueError(f"{QUANT_FILE}: {name} has dtype {meta['dtype']!r}, the config "
                             f"{saved.dtype!r}")
        shape = tuple(flat.pop(name).shape)
        if name == EMBEDDING:  # a quantized table is stored as the LM head is, [D, V]
            if meta.get("format") == "bsr":
                raise ValueError(f"{QUANT_FILE}: {name} is stored group-sparse; a quantized "
                                 "token table must be a dense QuantizedLinear")
            shape = shape[::-1]
        meta_shapes[name] = shape
        shapes = _stored_shapes(meta, shape, name)
        flat.update({f"{name}/{key}": s for key, s in shapes.items()})
    _check_stored_arrays(stored, flat, params_path)
    target = flax.traverse_util.unflatten_dict(flat, sep="/")
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(params_path, target)
    except (ValueError, KeyError) as e:
        raise ValueError(f"checkpoint arrays in {params_path!r} do not fit its config and "
                         f"{QUANT_FILE}: {e}") from e
    flat = flax.traverse_util.flatten_dict(restored, sep="/")
    for name, meta in layers.items():
        if meta.get("format") == "bsr":
            from optgqa_jax.sparse.bsr import from_arrays
            arrays = {key: flat.pop(f"{name}/{key}") for key in _BSR_ARRAYS}
            flat[name] = from_arrays(**arrays, in_features=int(meta_shapes[name][0]),
                                     bits=meta["bits"], group_size=meta["group_size"],
                                     sym=meta["sym"], dtype=meta["dtype"], name=name)
            continue
        arrays = {key: flat.pop(f"{name}/{key}") for key in _ARRAYS}
        contiguous = meta.get("groups_contiguous")  # absent in older checkpoints
        if contiguous is None:
            contiguous = contiguous_groups(arrays["g_idx"], meta["group_size"])
        flat[name] = QuantizedLinear(**arrays, bits=meta["bits"], group_size=meta["group_size"],
                                     sym=meta["sym"], dtype=meta["dtype"],
                                     groups_contiguous=bool(contiguous))
    params = flax.traverse_util.unflatten_dict(flat, sep="/")
    check_params_match(saved, params, what="checkpoint tensors")
    return saved, params
