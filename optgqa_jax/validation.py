"""Input checks shared by the generation loop and the engine."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def check_prompt_ids(ids: Sequence[int], vocab_size: int, name: str = "prompt") -> None:
    """Raise ValueError naming `name` if the prompt is empty, not integer, or outside the vocabulary."""
    if len(ids) == 0:
        raise ValueError(f"{name} is empty; at least one token id is needed")
    arr = np.asarray(ids)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        bad = int(arr.min() if arr.min() < 0 else arr.max())
        raise ValueError(f"{name} contains id {bad}, outside the vocabulary "
                         f"[0, vocab_size={vocab_size})")
