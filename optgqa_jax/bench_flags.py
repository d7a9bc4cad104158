"""Parsers of ``optgqa bench``'s flags (``optgqa_jax.benchmark.add_arguments``): each checks
its flag before any work starts and exits with a message naming it."""

from __future__ import annotations

from typing import Optional


def _xla_options(items: list[str]) -> Optional[dict]:
    """``--xla-option NAME=VALUE`` strings as compiler options (None when none are given)."""
    from optgqa_jax.engine.runner import parse_xla_options

    try:
        return parse_xla_options(items) or None
    except ValueError as e:
        raise SystemExit(f"--xla-option: {e}") from None


def _quant_spec(spec: Optional[str]) -> Optional[str]:
    """``--quantize`` checked before any work starts."""
    if spec is None:
        return None
    from optgqa_jax.sparse.synthetic import parse_serving_spec

    try:
        parse_serving_spec(spec)
    except ValueError as e:
        raise SystemExit(f"--quantize: {e}") from None
    return spec


def _sizes(flag: str, text: Optional[str], top: int = 1,
           what: str = "", unit: str = "token counts") -> Optional[tuple[int, ...]]:
    """A ``N,N,...`` flag of ascending positive counts, the last >= ``top``, checked before
    any work starts (None when not given)."""
    if text is None:
        return None
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        sizes = ()
    if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] < top:
        raise SystemExit(f"{flag} {text!r}: expected ascending positive {unit}{what}")
    return sizes


def seq_buckets_for(max_num_seqs: int) -> tuple[int, ...]:
    """The benchmark's decode-step sequence buckets for ``max_num_seqs`` S: 64 and 256 where
    below S, then 3/4, 7/8, 15/16 and 31/32 of S (those that are multiples of 8 above 256),
    and S.

    Near S a step padded to the next power of two wastes whole rows of every matrix product,
    which at hundreds of rows are bound by the tensor cores: the 1000 x 256/256 workload's
    second wave decodes 488 sequences for 221 steps (``experiments/schedule_replay.py``),
    padded to 512 without the buckets near the top.
    """
    S = max_num_seqs
    near = {n for n in (S * 3 // 4, S * 7 // 8, S * 15 // 16, S * 31 // 32)
            if n > 256 and n % 8 == 0}
    below = {b for b in (64, 256) if b < S}
    return tuple(sorted((below | near) - {S})) + (S,)


def _seq_buckets(text: Optional[str], top: int) -> Optional[tuple[int, ...]]:
    """``--seq-buckets`` checked before any work starts (None when not given)."""
    return _sizes("--seq-buckets", text, top, f", the last >= --max-num-seqs ({top})",
                  unit="sequence counts")


def _token_buckets(text: Optional[str], top: int) -> Optional[tuple[int, ...]]:
    """``--token-buckets`` checked before any work starts (None when not given)."""
    return _sizes("--token-buckets", text, top,
                  f", the last >= --max-num-batched-tokens ({top})")


def _context_buckets(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``--context-buckets`` checked before any work starts (None when not given)."""
    return _sizes("--context-buckets", text)
