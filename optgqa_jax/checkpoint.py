"""Save and restore (config, params) with orbax-checkpoint.

Layout of a checkpoint directory::

    path/
      optgqa_config.json   # ModelConfig.to_json()
      params/              # orbax StandardCheckpointer tree
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import orbax.checkpoint as ocp

from optgqa_jax.config import ModelConfig
from optgqa_jax.model import abstract_params, check_params_match

CONFIG_FILE = "optgqa_config.json"
PARAMS_DIR = "params"


def save_checkpoint(path: str, cfg: ModelConfig, params: dict, *, overwrite: bool = False) -> str:
    """Write `cfg` and `params` to the directory `path` (created; must not exist unless `overwrite`).

    Returns:
      The absolute checkpoint path.

    Raises:
      FileExistsError: `path` exists and `overwrite` is false.
      ValueError: `params` do not match `cfg`.
    """
    path = os.path.abspath(path)
    check_params_match(cfg, params, what="params")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"checkpoint path {path!r} already exists; pass overwrite=True")
    os.makedirs(path, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, PARAMS_DIR), params, force=overwrite)
    checkpointer.wait_until_finished()
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        f.write(cfg.to_json())
    return path


def is_checkpoint(path: str) -> bool:
    """Whether `path` is a directory written by :func:`save_checkpoint`."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def load_checkpoint(path: str, cfg: Optional[ModelConfig] = None) -> tuple[ModelConfig, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`; arrays are restored bit-exactly.

    Args:
      path: checkpoint directory.
      cfg: optional expected config. If given, the saved config must equal it;
        a mismatch raises ValueError listing the differing fields.

    Returns:
      (config, params).

    Raises:
      FileNotFoundError: `path` or its config/params are missing.
      ValueError: unreadable config, config mismatch, or stored arrays that do
        not fit the config.
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
    target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                                    abstract_params(saved))
    checkpointer = ocp.StandardCheckpointer()
    try:
        params = checkpointer.restore(params_path, target)
    except (ValueError, KeyError) as e:
        raise ValueError(f"checkpoint arrays in {params_path!r} do not fit its config: {e}") from e
    check_params_match(saved, params, what="checkpoint tensors")
    return saved, params
