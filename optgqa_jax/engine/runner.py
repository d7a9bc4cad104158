"""Device side of the engine: the KV pool, step inputs in static shape buckets, the jitted step.

The pool is one pre-allocated pytree, a [K, P, Z, H] key and value array per
layer, in the Pallas kernels' page layout. It is donated to every step and
updated in place; it is never re-allocated while serving.

A step packs the scheduled tokens of all sequences along one axis. To keep
the number of compiled programs small and fixed, shapes are padded to
buckets: decode-only steps to a power-of-two number of sequences; mixed
(prefill) steps to a power-of-two token count, with the sequence axis always
``max_num_seqs`` wide; block tables span ``max_model_len``, or, with context
buckets, the smallest bucket that holds the step's longest context (a static
bound the attention kernels pick their tiles by). Each bucket has a greedy and
a sampling program (the host knows which a step needs). So at most
``2 * (log2(max_num_seqs) + log2(max_num_batched_tokens) + 2)`` programs exist
per table width, and :meth:`ModelRunner.warmup` compiles all of them up front.

A step's inputs travel as one packed int32 buffer (:func:`pack_inputs`). Its
sampled tokens stay on the device until read, padded to ``max_rows``, so the
next step can take its input ids from them (asynchronous scheduling).

Axis legend: T packed tokens, B sequences, M pages per sequence, L layers,
K KV heads, P pool pages, Z page size, H head dim, V vocabulary.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels._common import backend as kernel_backend
from optgqa_jax import sharding
from optgqa_jax.config import ModelConfig
from optgqa_jax.engine.scheduler import Scheduled
from optgqa_jax.kv_layers import PagedBatch, PagedLayerKV
from optgqa_jax.layer_stack import is_stacked, layer_views
from optgqa_jax.model import Transformer
from optgqa_jax.sampling import row_keys, sample


class KVPool(NamedTuple):
    """The paged KV pool: per layer, k and v pages [K, P, Z, H]."""

    k: tuple
    v: tuple

    @classmethod
    def create(cls, cfg: ModelConfig, num_pages: int, page_size: int) -> "KVPool":
        """A zeroed pool: per layer, K and V pages of shape [K, P, Z, H] in the model's dtype."""
        shape = (cfg.n_kv_heads, num_pages, page_size, cfg.head_dim)
        zeros = lambda: jnp.zeros(shape, cfg.jnp_dtype)  # noqa: E731
        return cls(tuple(zeros() for _ in range(cfg.n_layers)),
                   tuple(zeros() for _ in range(cfg.n_layers)))


def page_bytes(cfg: ModelConfig, page_size: int) -> int:
    """Device bytes of one page across all layers, keys and values."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * page_size * cfg.head_dim * cfg.jnp_dtype.itemsize


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(n - 1).bit_length()))


class StepInputs(NamedTuple):
    tokens: np.ndarray        # int32 [T]
    positions: np.ndarray     # int32 [T]
    slot_mapping: np.ndarray  # int32 [T]
    token_seq: np.ndarray     # int32 [T]
    block_tables: np.ndarray  # int32 [B, M]
    context_lens: np.ndarray  # int32 [B]
    cu_q_lens: np.ndarray     # int32 [B + 1]
    select: np.ndarray        # int32 [B] packed index of each sequence's last token
    temperature: np.ndarray   # float32 [B]
    top_k: np.ndarray         # int32 [B]
    top_p: np.ndarray         # float32 [B]
    seeds: np.ndarray         # uint32 [B]
    sample_pos: np.ndarray    # int32 [B] position of the token being sampled
    token_src: np.ndarray     # int32 [T] -1: the id is in `tokens`; i >= 0: it is row i of the
    #                           previous step's sampled tokens, still on the device
    next_ids: np.ndarray      # int32 [T] the prompt id after each token (-1: none or not asked);
    #                           read only by steps that return prompt log-probabilities
    kv_order: np.ndarray      # int32 [T] tokens in ascending slot order (sort_kv_writes); read
    #                           only by runners with sorted_kv_writes


def pack_inputs(inputs: StepInputs) -> tuple[np.ndarray, tuple]:
    """One int32 host buffer holding every field (all are 4-byte types), and its static layout.

    A step then costs one host-to-device copy instead of one per field.
    """
    layout = tuple((a.shape, a.dtype.str) for a in inputs)
    buf = np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.int32) for a in inputs])
    return buf, layout


def unpack_inputs(buf: jax.Array, layout: tuple) -> StepInputs:
    """Inverse of :func:`pack_inputs`, inside the jitted step (slices and bitcasts, no copies)."""
    fields, offset = [], 0
    for shape, dtype in layout:
        n = int(np.prod(shape))
        seg = jax.lax.slice_in_dim(buf, offset, offset + n)
        if np.dtype(dtype) != np.int32:
            seg = jax.lax.bitcast_convert_type(seg, np.dtype(dtype))
        fields.append(seg.reshape(shape))
        offset += n
    return StepInputs(*fields)


# XLA command types captured into command buffers (CUDA graphs) for small steps
COMMAND_BUFFER_COMMANDS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL"


def default_compiler_options(backend: str, command_buffers: bool = False) -> dict:
    """XLA options the engine compiles its steps with, per backend.

    On CUDA, command buffers (CUDA graphs) are off unless ``command_buffers``:
    the engine turns them on only for steps of few tokens
    (``EngineConfig.command_buffer_max_tokens``). On an H100 (Llama-3-8B shape)
    the decode step of 256 sequences ran 0.2-0.8 ms faster without them in every
    one of four measured configurations (``experiments/profile_decode.py
    --xla-flags-variant``), while a batch-1 step, whose ~650-714 kernels the host
    launches at ~12 µs each, is bound by those launches: with command buffers
    batch-1 decode went from 148 to 161 tokens/s in bfloat16 and from 101 to 213
    with W4 g128 weights (``experiments/results/h100/batch1/``, commit 2807e86).
    The kernels' own options are added (:func:`pallas_kernels.compiler_options`:
    float32 denormals flushed to zero, so their exponentials are one instruction).
    """
    if backend != "cuda":
        return {}
    return {"xla_gpu_enable_command_buffer": COMMAND_BUFFER_COMMANDS if command_buffers else "",
            **pallas_kernels.compiler_options("cuda")}


def parse_xla_options(items: Sequence[str]) -> dict:
    """``NAME=VALUE`` strings (command-line flags) as compiler options: "true"/"false" become
    bools and integers ints, as XLA's option setter wants; anything else stays a string."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"an XLA option must be written NAME=VALUE, got {item!r}")
        if value.lower() in ("true", "false"):
            out[name] = value.lower() == "true"
        else:
            try:
                out[name] = int(value)
            except ValueError:
                out[name] = value
    return out


def sort_kv_writes(inputs: StepInputs, pool_slots: int) -> StepInputs:
    """`inputs` with unique K/V slots and the order that sorts them (host side, numpy).

    Padding tokens point past the pool (``slot_mapping >= pool_slots``: their writes are
    dropped), all at one slot as :meth:`ModelRunner.build` leaves them; here each gets its own
    slot past the pool, so that every slot is unique, and ``kv_order`` becomes the stable
    argsort of the slots (the real tokens first, ascending, then the padding). The step then
    writes K/V with one scatter whose indices are sorted and unique
    (``kv_layers.PagedBatch.kv_order``)."""
    slots = inputs.slot_mapping.copy()
    pad = slots >= pool_slots
    slots[pad] = pool_slots + np.arange(int(pad.sum()), dtype=np.int32)
    order = np.argsort(slots, kind="stable").astype(np.int32)
    return inputs._replace(slot_mapping=slots, kv_order=order)


# Stable step buffers (``ModelRunner(stable_buffers=True)``): XLA records a command buffer
# (CUDA graph) with the device addresses of the step's arguments and outputs, and updates the
# recorded commands whenever one of those addresses changes. A fresh input copy and a fresh
# token output per step change them every step; so does the token output's allocation when XLA
# places scalar temporaries in it. On an H100 (Llama-3-8B W4S50, batch 1, commit 1e1715e) that
# update took about 0.75-1.1 ms of host time per step. Held buffers keep those addresses
# fixed: the inputs are written into one device buffer per input size (a donated in-place
# copy), and the sampled tokens go into one donated [R] buffer that the next step also reads
# its device-side ids from; the host reads a copy. The updates then stop, but the graph's
# launch still took 2.9-3.3 ms of host time per step, and the two copies are launches of
# their own: the engine's batch-1 decode was not faster (EngineConfig.stable_step_buffers).
#
# _overwrite: new's values at held's address (an update of the donated buffer; returning `new`
# itself would hand back new's own buffer).
_overwrite = jax.jit(lambda held, new: jax.lax.dynamic_update_slice(held, new, (0,)),
                     donate_argnums=0)
_snapshot = jax.jit(lambda tokens: tokens + 0)                  # a copy the host may keep


def _packed_step(cfg: ModelConfig, params, pool: KVPool, buf: jax.Array, prev_tokens: jax.Array,
                 *, layout: tuple, impl: str, max_q_len: int, decode_only: bool,
                 stochastic: bool, logprobs_k: int = -1, prompt_logprobs: bool = False,
                 mesh=None, sorted_kv_writes: bool = False, kv_write_kernel: bool = False,
                 rope_kv_write: bool = False, add_norm_kernel: bool = False):
    """The jitted step: unpack the inputs, take ids still on the device from `prev_tokens`
    (the previous step's output, [R]), run :func:`_step`; tokens come back padded to [R],
    with the log-probability outputs (or None) of :func:`_step`."""
    inputs = unpack_inputs(buf, layout)
    src = inputs.token_src
    tokens = jnp.where(src >= 0, prev_tokens[jnp.maximum(src, 0)], inputs.tokens)
    next_tokens, pool, extras = _step(cfg, params, pool, inputs._replace(tokens=tokens),
                                      impl=impl, max_q_len=max_q_len, decode_only=decode_only,
                                      stochastic=stochastic, logprobs_k=logprobs_k,
                                      prompt_logprobs=prompt_logprobs, mesh=mesh,
                                      sorted_kv_writes=sorted_kv_writes,
                                      kv_write_kernel=kv_write_kernel,
                                      rope_kv_write=rope_kv_write,
                                      add_norm_kernel=add_norm_kernel)
    padded = jnp.zeros(prev_tokens.shape, jnp.int32).at[:next_tokens.shape[0]].set(next_tokens)
    return padded, pool, extras


def _top(logp: jax.Array, ids: jax.Array, k: int):
    """(log-probability of `ids` [R], top-k ids [R, k], their log-probabilities [R, k])."""
    chosen = jnp.take_along_axis(logp, jnp.maximum(ids, 0)[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, k)
    return chosen, top_ids.astype(jnp.int32), top_lp


def _step(cfg: ModelConfig, params, pool: KVPool, inputs: StepInputs, *, impl: str, max_q_len: int,
          decode_only: bool, stochastic: bool, logprobs_k: int = -1,
          prompt_logprobs: bool = False, mesh=None, sorted_kv_writes: bool = False,
          kv_write_kernel: bool = False, rope_kv_write: bool = False,
          add_norm_kernel: bool = False):
    """One engine step (traced inside the runner's jit): returns (next tokens [B], new pool,
    extras). ``logprobs_k >= 1`` adds the sampled tokens' log-probabilities and top-k
    (``extras["sample"]``: [B], [B, k], [B, k]); ``prompt_logprobs`` computes the logits of
    every packed token and adds, per token, the log-probability of ``next_ids`` and the top-k
    (``extras["prompt"]``: [T], [T, k], [T, k]). Log-probabilities are
    ``log_softmax(logits)`` in float32, before temperature or truncation. ``mesh``: the
    tensor-parallel mesh (static), on which the attention kernels run per device.
    ``sorted_kv_writes`` (static): write K/V in ``inputs.kv_order`` (:func:`sort_kv_writes`).
    ``kv_write_kernel`` (static): write them with ``pallas_kernels.kv_write`` where the
    attention runs its Pallas kernels (``kv_layers.PagedBatch.write_kernel``).
    ``rope_kv_write`` (static): on RoPE layers with fused q/k/v, rotate and write with
    ``pallas_kernels.rope_kv_write`` (``kv_layers.PagedBatch.rope_write``).
    ``add_norm_kernel`` (static): residual adds and norms as ``pallas_kernels.add_rms_norm``
    (``model.Transformer``'s ``add_norm_kernel``)."""
    batch = PagedBatch(inputs.slot_mapping, inputs.token_seq, inputs.block_tables,
                       inputs.context_lens, inputs.cu_q_lens, max_q_len, decode_only,
                       inputs.kv_order if sorted_kv_writes else None, kv_write_kernel,
                       rope_kv_write)
    layers = [PagedLayerKV(pool.k[i], pool.v[i], batch) for i in range(cfg.n_layers)]
    if is_stacked(params):   # EngineConfig.stack_layers: the per-layer tree, stacks read in place
        params = layer_views(params, cfg.n_layers)
    select = None if prompt_logprobs else inputs.select[None]
    specs = None if mesh is None else sharding.partition_specs(cfg, params, mesh)
    with sharding.kernel_mesh(mesh, specs):   # the Pallas kernels run per device on the mesh
        logits, layers = Transformer(cfg, impl, add_norm_kernel).apply(
            {"params": params}, inputs.tokens[None], inputs.positions[None], layers,
            select=select)  # [1, B, V], or [1, T, V] for prompt log-probabilities
    all_logits = logits[0]
    if prompt_logprobs:
        logits = all_logits[inputs.select][None]                          # [1, B, V]
    keys = row_keys(inputs.seeds, inputs.sample_pos)
    next_tokens = sample(logits[0], keys, inputs.temperature, inputs.top_k, inputs.top_p,
                         stochastic=stochastic)
    new_pool = KVPool(tuple(l.k_pages for l in layers), tuple(l.v_pages for l in layers))
    extras = None
    if logprobs_k >= 1:
        extras = {"sample": _top(jax.nn.log_softmax(logits[0].astype(jnp.float32)),
                                 next_tokens, logprobs_k)}
        if prompt_logprobs:
            extras["prompt"] = _top(jax.nn.log_softmax(all_logits.astype(jnp.float32)),
                                    inputs.next_ids, logprobs_k)
    return next_tokens, new_pool, extras


class ModelRunner:
    """Builds padded step inputs and runs the jitted step; counts compiled shape buckets.

    ``compiler_options`` go to ``jax.jit(..., compiler_options=...)`` for every step
    program; None uses :func:`default_compiler_options` for the backend, with command
    buffers on for steps of at most ``command_buffer_max_tokens`` tokens (decode steps of
    that many sequences, mixed steps padded to that many tokens; 0: for none).

    ``stable_buffers`` (one device only): every step reads its packed inputs from one held
    device buffer per input size, written in place each step, and writes its sampled tokens
    into one held, donated [R] buffer that the next step also reads its device-side ids from;
    ``dispatch`` returns a copy of those tokens. The addresses a recorded command buffer uses
    then stay the same from step to step, so XLA replays it without updating its commands
    (see the note above ``_overwrite``). Outputs are unchanged. Off by default: measured, it
    did not make batch-1 decode faster (``EngineConfig.stable_step_buffers``).

    ``context_buckets``: context lengths (tokens, ascending) that a step's block tables are
    cut to: a step whose longest context (its sequences' lengths after the step) fits in a
    bucket gets tables of that many tokens' pages, the others of ``max_model_len``'s. The
    tables' width is a static bound on the contexts: the decode kernel picks its tiles by it
    (``PagedAttentionConfig.for_backend(max_context=...)``), and the step copies fewer table
    entries to the device. Each width is its own set of programs. None: one width,
    ``max_model_len``'s.

    ``sorted_kv_writes``: each step's K/V rows are written in ascending slot order with
    unique slots (:func:`sort_kv_writes` on the host, ``kv_layers.PagedBatch.kv_order`` on
    the device), so XLA's scatter may assume sorted, unique indices. Outputs are unchanged.
    On by default, as ``EngineConfig.sorted_kv_writes`` (timed there).

    ``kv_write_kernel``: the K/V rows are written by ``pallas_kernels.kv_write`` (in place,
    one Triton launch per layer) instead of XLA's scatter, wherever the attention runs its
    Pallas kernels; as ``EngineConfig.kv_write_kernel``. ``rope_kv_write``: on RoPE layers
    with fused q/k/v, the rotations and the write are one ``pallas_kernels.rope_kv_write``
    launch per layer; as ``EngineConfig.rope_kv_write``. ``add_norm_kernel``: each residual
    add and the norm after it are one ``pallas_kernels.add_rms_norm`` launch; as
    ``EngineConfig.add_norm_kernel``.
    """

    def __init__(self, cfg: ModelConfig, params, *, num_pages: int, page_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, impl: str,
                 seq_buckets=None, token_buckets=None, compiler_options=None,
                 command_buffer_max_tokens: int = 0, max_logprobs: int = 20, mesh=None,
                 stable_buffers: bool = False, sorted_kv_writes: bool = True,
                 context_buckets=None, kv_write_kernel: bool = False,
                 rope_kv_write: bool = False, add_norm_kernel: bool = False):
        if stable_buffers and mesh is not None:
            raise ValueError("stable_buffers=True needs a single device (mesh=None)")
        self.mesh = mesh
        if mesh is not None:  # tensor parallel: weights by the partition rules
            params = sharding.shard_params(cfg, params, mesh)
        self.cfg, self.params, self.impl = cfg, params, impl
        self.logprobs_k = max(1, min(max_logprobs, cfg.vocab_size))  # static top-k width
        # Options of steps above / up to command_buffer_max_tokens tokens: the backend's
        # defaults (command buffers only for the small ones), or the caller's for every step.
        backend = kernel_backend()
        small = None
        if compiler_options is None:
            compiler_options = default_compiler_options(backend)
            if mesh is None:   # with several devices the step's collectives stay ungraphed
                small = default_compiler_options(backend, command_buffers=True)
        self.compiler_options = dict(compiler_options)
        self.small_compiler_options = dict(compiler_options if small is None else small)
        self.command_buffer_max_tokens = int(command_buffer_max_tokens)
        # the jitted step: one program per (decode_only, bucket size, greedy or sampling); the
        # pool is donated (with stable_buffers the held token buffer too, so the token output
        # lands in it). One jit per distinct option set.
        self.stable_buffers = bool(stable_buffers)
        self.sorted_kv_writes = bool(sorted_kv_writes)
        self.kv_write_kernel = bool(kv_write_kernel)
        self.rope_kv_write = bool(rope_kv_write)
        self.add_norm_kernel = bool(add_norm_kernel)
        donated = ("pool", "prev_tokens") if self.stable_buffers else ("pool",)
        jit = lambda opts: jax.jit(  # noqa: E731
            _packed_step, donate_argnames=donated,
            static_argnames=("cfg", "layout", "impl", "max_q_len", "decode_only", "stochastic",
                             "logprobs_k", "prompt_logprobs", "mesh", "sorted_kv_writes",
                             "kv_write_kernel", "rope_kv_write", "add_norm_kernel"),
            compiler_options=opts or None)
        self.step_fn = jit(self.compiler_options)
        self.small_step_fn = (self.step_fn if self.small_compiler_options == self.compiler_options
                              else jit(self.small_compiler_options))
        self.num_pages, self.page_size = num_pages, page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_pages_per_seq = -(-max_model_len // page_size)
        # block-table widths (pages), ascending; the last spans max_model_len
        self.table_widths = tuple(sorted(
            {-(-int(c) // page_size) for c in (context_buckets or ()) if c < max_model_len}
            | {self.max_pages_per_seq}))
        self.pool = KVPool.create(cfg, num_pages, page_size)
        if mesh is not None:  # pages split by KV heads where the K/V projections are
            place = lambda i, a: jax.device_put(a, sharding.kv_pages_sharding(cfg, mesh, i))  # noqa: E731
            self.pool = KVPool(tuple(place(i, a) for i, a in enumerate(self.pool.k)),
                               tuple(place(i, a) for i, a in enumerate(self.pool.v)))
        self.signatures: set = set()
        self.seq_buckets = tuple(seq_buckets) if seq_buckets else tuple(sorted(
            {_pow2(n) for n in range(1, max_num_seqs + 1)}))
        self.token_buckets = tuple(token_buckets) if token_buckets else tuple(sorted(
            {_pow2(n, 16) for n in range(1, max_num_batched_tokens + 1)}))
        self.max_rows = max(self.max_num_seqs, self.seq_buckets[-1])  # rows of any step
        self._no_prev = jnp.zeros((self.max_rows,), jnp.int32)
        if mesh is not None:
            self._no_prev = jax.device_put(self._no_prev, sharding.replicated(mesh))
        # stable_buffers: the held token buffer (the last step's tokens), the copy of it the
        # last dispatch returned, and one held input buffer per packed input length
        self._held_tokens = jnp.zeros((self.max_rows,), jnp.int32) if self.stable_buffers \
            else None
        self._last_snapshot = None
        self._held_inputs: dict = {}

    def step_fn_for(self, size: int):
        """The jitted step for a bucket of ``size`` rows (sequences or tokens): the one with
        command buffers up to ``command_buffer_max_tokens``, the other above."""
        return self.small_step_fn if size <= self.command_buffer_max_tokens else self.step_fn

    def options_for(self, size: int) -> dict:
        """The XLA compiler options a step of ``size`` rows is compiled with."""
        return (self.small_compiler_options if size <= self.command_buffer_max_tokens
                else self.compiler_options)

    @property
    def compiles(self) -> int:
        """Distinct step programs compiled so far ((bucket, greedy or sampling) pairs seen)."""
        return len(self.signatures)

    def buckets(self) -> list[tuple[bool, int, int]]:
        """Every (decode_only, size, table width in pages) bucket the runner can produce."""
        return [(d, n, w) for d, n in ([(True, b) for b in self.seq_buckets]
                                       + [(False, t) for t in self.token_buckets])
                for w in self.table_widths]

    @staticmethod
    def _fit(n: int, buckets: tuple) -> int:
        return next(b for b in buckets if b >= n)

    def _empty(self, decode_only: bool, size: int, width: Optional[int] = None) -> StepInputs:
        """All-padding inputs of a bucket; ``width``: block-table pages (default: the widest)."""
        B = size if decode_only else max(self.max_num_seqs, self.seq_buckets[-1])
        width = self.max_pages_per_seq if width is None else width
        T = size
        drop = self.num_pages * self.page_size  # past the pool: writes are dropped
        return StepInputs(
            tokens=np.zeros(T, np.int32), positions=np.zeros(T, np.int32),
            slot_mapping=np.full(T, drop, np.int32), token_seq=np.zeros(T, np.int32),
            block_tables=np.zeros((B, width), np.int32),
            context_lens=np.zeros(B, np.int32), cu_q_lens=np.zeros(B + 1, np.int32),
            select=np.zeros(B, np.int32), temperature=np.zeros(B, np.float32),
            top_k=np.zeros(B, np.int32), top_p=np.ones(B, np.float32),
            seeds=np.zeros(B, np.uint32), sample_pos=np.zeros(B, np.int32),
            token_src=np.full(T, -1, np.int32), next_ids=np.full(T, -1, np.int32),
            kv_order=np.arange(T, dtype=np.int32))

    def build(self, scheduled: Sequence[Scheduled], tables: dict,
              from_prev: Optional[dict] = None) -> tuple[StepInputs, bool, int]:
        """Pack the scheduled tokens into bucket-shaped numpy arrays.

        ``from_prev`` maps request ids to their row in the previous step's output:
        those requests decode the token that step sampled, which the host has not
        read yet (asynchronous scheduling); it stays on the device.
        """
        from_prev = from_prev or {}
        decode_only = all(s.num_new == 1 for s in scheduled)
        total = sum(s.num_new for s in scheduled)
        size = (self._fit(len(scheduled), self.seq_buckets) if decode_only
                else self._fit(total, self.token_buckets))
        longest = max((s.start + s.num_new for s in scheduled), default=0)
        x = self._empty(decode_only, size,
                        self._fit(-(-longest // self.page_size), self.table_widths))
        fill = self._fill_decode if decode_only else self._fill_packed
        fill(x, scheduled, tables, from_prev)
        return x, decode_only, size

    def _fill_packed(self, x: StepInputs, scheduled: Sequence[Scheduled], tables: dict,
                     from_prev: dict) -> None:
        """:meth:`build` for any step: each sequence's new tokens, one sequence at a time."""
        Z = self.page_size
        t = 0
        for b, s in enumerate(scheduled):
            req = s.request
            pos = np.arange(s.start, s.start + s.num_new, dtype=np.int32)
            table = np.asarray(tables[req.request_id], np.int32)
            if req.request_id in from_prev:
                x.token_src[t] = from_prev[req.request_id]  # one token, sampled last step
            else:
                x.tokens[t:t + s.num_new] = req.all_ids[s.start:s.start + s.num_new]
            x.positions[t:t + s.num_new] = pos
            if req.params.prompt_logprobs is not None:  # the prompt id each token predicts
                n_prompt = len(req.prompt_ids)
                nxt = pos + 1
                inside = nxt < n_prompt
                x.next_ids[t:t + s.num_new][inside] = np.asarray(req.prompt_ids,
                                                                 np.int32)[nxt[inside]]
            x.slot_mapping[t:t + s.num_new] = table[pos // Z] * Z + pos % Z
            x.token_seq[t:t + s.num_new] = b
            table = table[:x.block_tables.shape[1]]   # pages past the context are not read
            x.block_tables[b, :len(table)] = table
            x.context_lens[b] = s.start + s.num_new
            x.cu_q_lens[b + 1] = t + s.num_new
            x.select[b] = t + s.num_new - 1
            p = req.params
            x.temperature[b], x.top_k[b], x.top_p[b] = p.temperature, p.top_k, p.top_p
            x.seeds[b] = req.seed
            x.sample_pos[b] = s.start + s.num_new
            t += s.num_new
        x.cu_q_lens[len(scheduled) + 1:] = t

    def _fill_decode(self, x: StepInputs, scheduled: Sequence[Scheduled], tables: dict,
                     from_prev: dict) -> None:
        """:meth:`build` for a decode-only step (one token per sequence), with array operations
        instead of a Python loop per sequence: the host's cost of a step of 256 sequences."""
        n, Z = len(scheduled), self.page_size
        reqs = [s.request for s in scheduled]
        pos = np.fromiter((s.start for s in scheduled), np.int32, n)
        M = x.block_tables.shape[1]     # pages past the contexts are not read
        rows = [tables[r.request_id][:M] for r in reqs]
        lens = np.fromiter(map(len, rows), np.int32, n)
        filled = np.arange(M)[None, :] < lens[:, None]  # [n, M]
        x.block_tables[:n][filled] = np.fromiter(itertools.chain.from_iterable(rows), np.int32,
                                                 int(lens.sum()))
        rowid = np.arange(n, dtype=np.int32)
        x.slot_mapping[:n] = x.block_tables[rowid, pos // Z] * Z + pos % Z
        x.tokens[:n] = [0 if r.request_id in from_prev else r.token_at(p)
                        for r, p in zip(reqs, pos.tolist())]
        x.token_src[:n] = [from_prev.get(r.request_id, -1) for r in reqs]
        x.positions[:n] = pos
        x.token_seq[:n] = rowid
        x.context_lens[:n] = pos + 1
        x.cu_q_lens[1:n + 1] = rowid + 1
        x.cu_q_lens[n + 1:] = n
        x.select[:n] = rowid
        x.temperature[:n] = [r.params.temperature for r in reqs]
        x.top_k[:n] = [r.params.top_k for r in reqs]
        x.top_p[:n] = [r.params.top_p for r in reqs]
        x.seeds[:n] = [r.seed for r in reqs]
        x.sample_pos[:n] = pos + 1

    @staticmethod
    def _stochastic(inputs: StepInputs) -> bool:
        """Whether any row samples (temperature > 0): decided on the host, so a greedy step
        is a program without the vocabulary sort and without a device-side branch."""
        return bool(np.any(inputs.temperature > 0))

    def _args(self, inputs: StepInputs, decode_only: bool, size: int, prev_tokens=None,
              logprobs: bool = False, prompt_logprobs: bool = False):
        buf, layout = self.pack(inputs)
        return self._device_args(jax.device_put(buf), layout, decode_only, size, prev_tokens,
                                 self._stochastic(inputs), logprobs, prompt_logprobs)

    def pack(self, inputs: StepInputs) -> tuple[np.ndarray, tuple]:
        """:func:`pack_inputs` of the inputs as this runner's step reads them (with
        ``sorted_kv_writes``, after :func:`sort_kv_writes`)."""
        if self.sorted_kv_writes:
            inputs = sort_kv_writes(inputs, self.num_pages * self.page_size)
        return pack_inputs(inputs)

    def _device_args(self, dev: jax.Array, layout: tuple, decode_only: bool, size: int,
                     prev_tokens=None, stochastic: bool = False, logprobs: bool = False,
                     prompt_logprobs: bool = False):
        """The step's arguments from its packed inputs already on the device (``dev``)."""
        if self.stable_buffers:
            held = self._held_inputs.get(dev.shape[0])
            dev = _overwrite(jnp.zeros(dev.shape, jnp.int32) if held is None else held, dev)
            self._held_inputs[dev.shape[0]] = dev
            if prev_tokens is not None and prev_tokens is not self._last_snapshot:
                # ids from another array than the last step's output: copy them in first
                self._held_tokens = _overwrite(self._held_tokens, prev_tokens)
            prev = self._held_tokens
        else:
            prev = self._no_prev if prev_tokens is None else prev_tokens
        return ((self.cfg, self.params, self.pool, dev, prev),
                dict(layout=layout, impl=self.impl, max_q_len=1 if decode_only else size,
                     decode_only=decode_only, stochastic=stochastic,
                     logprobs_k=self.logprobs_k if logprobs or prompt_logprobs else -1,
                     prompt_logprobs=prompt_logprobs, mesh=self.mesh,
                     sorted_kv_writes=self.sorted_kv_writes,
                     kv_write_kernel=self.kv_write_kernel,
                     rope_kv_write=self.rope_kv_write,
                     add_norm_kernel=self.add_norm_kernel))

    def dispatch(self, inputs: StepInputs, decode_only: bool, size: int,
                 prev_tokens: Optional[jax.Array] = None, *, logprobs: bool = False,
                 prompt_logprobs: bool = False) -> tuple[jax.Array, Optional[dict]]:
        """Launch one step (asynchronously); returns its sampled tokens on the device, one per
        row, padded to [max_rows], and its log-probability outputs (None unless `logprobs` or
        `prompt_logprobs`; see :func:`_step`). ``prev_tokens`` is the previous step's token
        array (the source of ``inputs.token_src``)."""
        self.signatures.add((decode_only, size, inputs.block_tables.shape[1],
                             self._stochastic(inputs), logprobs, prompt_logprobs))
        args, kwargs = self._args(inputs, decode_only, size, prev_tokens, logprobs,
                                  prompt_logprobs)
        return self._launch(size, args, kwargs)

    def dispatch_device(self, dev: jax.Array, layout: tuple, decode_only: bool, size: int,
                        stochastic: bool = False) -> jax.Array:
        """:meth:`dispatch` for inputs packed and copied to the device by the caller
        (``jax.device_put(runner.pack(inputs)[0])``; profiling splits those phases); no ids
        from a previous step. Returns the step's sampled tokens [max_rows]."""
        args, kwargs = self._device_args(dev, layout, decode_only, size, None, stochastic)
        return self._launch(size, args, kwargs)[0]

    def _launch(self, size: int, args, kwargs):
        tokens, self.pool, extras = self.step_fn_for(size)(*args, **kwargs)
        if self.stable_buffers:   # the held buffer stays with the runner; the caller gets a copy
            self._held_tokens = tokens
            tokens = self._last_snapshot = _snapshot(tokens)
        return tokens, extras

    def run(self, inputs: StepInputs, decode_only: bool, size: int) -> np.ndarray:
        """Run one step and wait for its sampled tokens (host int32 [B])."""
        return np.asarray(self.dispatch(inputs, decode_only, size)[0])

    def lower(self, inputs: StepInputs, decode_only: bool, size: int):
        """The step's ``jax.stages.Lowered`` for these inputs (to read its HLO)."""
        args, kwargs = self._args(inputs, decode_only, size)
        return self.step_fn_for(size).lower(*args, **kwargs)

    def warmup(self, sampling: bool = True) -> None:
        """Compile every bucket with all-padding steps (they write nothing): the greedy
        programs and, with ``sampling``, the sampling ones too (``2 * len(buckets())``
        programs; ``len(buckets())`` without)."""
        for decode_only, size, width in self.buckets():
            for temperature in ((0.0, 1.0) if sampling else (0.0,)):
                x = self._empty(decode_only, size, width)
                x.temperature[:] = temperature
                self.run(x, decode_only, size)
