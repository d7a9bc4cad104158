"""The files of a training run: checkpoints, the run record, the log and the loss plot.

Layout of ``out_dir`` (written by :func:`optgqa_jax.train.train`)::

    out_dir/
      train_config.json        # what the run trains: TrainConfig, ModelConfig, data fingerprint
      train_log.json           # configs, logged steps, evaluations, wall time (after every log)
      loss.png                 # train and eval loss against the step
      checkpoints/step_<N>/    # orbax StandardCheckpointer tree of the whole train state

Only complete checkpoints carry the plain ``step_<N>`` name (orbax writes into a temporary
directory and renames it when done), so a run killed while saving leaves the previous
checkpoint as the latest. All files but the checkpoints are written to a temporary name and
renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
RUN_FILE = "train_config.json"
LOG_FILE = "train_log.json"
PLOT_FILE = "loss.png"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_steps(out_dir: str) -> list[int]:
    """Steps of the complete checkpoints under ``out_dir/checkpoints``, ascending."""
    root = os.path.join(out_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    steps = [int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root)) if m]
    return sorted(steps)


def _step_path(out_dir: str, step: int) -> str:
    return os.path.join(os.path.abspath(out_dir), CHECKPOINT_DIR, f"step_{step:08d}")


def save_state(out_dir: str, step: int, state: Any, keep: int = 2) -> None:
    """Save the train state pytree as checkpoint `step`, then delete all but the latest `keep`.

    Blocks until the checkpoint is on disk: the caller donates the state's buffers to the next
    step right after.
    """
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(_step_path(out_dir, step), state, force=True)
    checkpointer.wait_until_finished()
    for old in checkpoint_steps(out_dir)[:-keep]:
        shutil.rmtree(_step_path(out_dir, old))


def restore_state(out_dir: str, step: int, like: Any) -> Any:
    """Restore checkpoint `step` into the structure, shapes and dtypes of the pytree `like`."""
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    try:
        return ocp.StandardCheckpointer().restore(_step_path(out_dir, step), target)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {_step_path(out_dir, step)!r} does not fit this run's "
                         f"train state (params or optimizer state differ): {e}") from e


def clear_checkpoints(out_dir: str) -> None:
    """Delete every checkpoint of an earlier run in `out_dir`."""
    shutil.rmtree(os.path.join(out_dir, CHECKPOINT_DIR), ignore_errors=True)


# ----------------------------------------------------------------------------- run record
def start_run(out_dir: str, record: dict, state: Any, *, resume: bool,
              may_differ: tuple[str, ...] = ()) -> tuple[Any, dict, float]:
    """Prepare `out_dir` for a run and pick up an earlier one.

    With `resume` and a checkpoint present: check the stored run record against `record`
    (:func:`check_run_record`), restore the latest checkpoint into the structure of `state`,
    and read back what the earlier run logged up to that checkpoint's step. Otherwise delete
    any earlier checkpoints. Either way the record is (re)written.

    Returns:
      (state, earlier history ``{part: {key: list}}`` up to the checkpoint, or {} when starting
      over, earlier wall time in seconds).
    """
    os.makedirs(out_dir, exist_ok=True)
    saved = checkpoint_steps(out_dir) if resume else []
    earlier, wall_s = {}, 0.0
    if saved:
        check_run_record(out_dir, record, ignore=may_differ)
        state = restore_state(out_dir, saved[-1], state)
        log = read_log(out_dir) or {}
        wall_s = float(log.get("wall_time_s", 0.0))
        for part, old in log.get("history", {}).items():  # entries past the checkpoint go
            rows = [i for i, step in enumerate(old.get("step", [])) if step <= saved[-1]]
            earlier[part] = {key: [values[i] for i in rows] for key, values in old.items()}
    else:
        clear_checkpoints(out_dir)
    write_run_record(out_dir, record)
    return state, earlier, wall_s


def check_run_record(out_dir: str, record: dict, ignore: tuple[str, ...] = ()) -> None:
    """Raise ValueError unless ``out_dir``'s stored run record equals `record`.

    Args:
      out_dir: the run directory (its record must exist).
      record: ``{section: {field: value}}``, JSON-serializable.
      ignore: ``"section.field"`` names allowed to differ (bookkeeping that does not change
        what is trained, such as how often to log).
    """
    with open(os.path.join(out_dir, RUN_FILE)) as f:
        stored = json.load(f)
    current = json.loads(json.dumps(record))  # the JSON round trip: lists, not tuples
    diffs = []
    for section in sorted(set(stored) | set(current)):
        old, new = stored.get(section, {}), current.get(section, {})
        for field in sorted(set(old) | set(new)):
            name = f"{section}.{field}"
            if name not in ignore and old.get(field) != new.get(field):
                diffs.append(f"{name}: checkpoint has {old.get(field)!r}, this run "
                             f"{new.get(field)!r}")
    if diffs:
        raise ValueError(f"cannot resume the run in {out_dir!r} with a different setup (pass "
                         "resume=False to start over, or another out_dir):\n  "
                         + "\n  ".join(diffs))


def write_run_record(out_dir: str, record: dict) -> None:
    _write_json(os.path.join(out_dir, RUN_FILE), record)


# ----------------------------------------------------------------------------- log and plot
def read_log(out_dir: str) -> Optional[dict]:
    """The parsed ``train_log.json`` of `out_dir`, or None when there is none."""
    path = os.path.join(out_dir, LOG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_log(out_dir: str, log: dict) -> None:
    _write_json(os.path.join(out_dir, LOG_FILE), log)


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def plot_losses(path: str, history: dict, title: str = "") -> None:
    """Write a PNG of the train loss (and eval loss, where any) against the step.

    Uses the Agg canvas directly, not pyplot, so it changes no global matplotlib state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train, evals = history["train"], history["eval"]
    ax.plot(train["step"], train["loss"], lw=1.2, label="train loss (logged steps)")
    if evals["step"]:
        ax.plot(evals["step"], evals["nll"], "o-", lw=1.2, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token NLL (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
