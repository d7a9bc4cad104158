"""Engine and sampling configuration (frozen dataclasses, validated on construction)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from optgqa_jax.weight_layout import check_projection_names


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request (vLLM's meaning for every field).

    Attributes:
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_p: nucleus mass in (0, 1].
      top_k: keep the k most likely tokens; 0 keeps all.
      max_tokens: tokens to generate at most (>= 1).
      seed: per-request seed; the sampled tokens depend only on (seed, prompt,
        position), never on what else is in the batch. None draws one.
      stop_token_ids: finish when one of these is generated (it is kept in the output).
      ignore_eos: do not stop at the tokenizer's EOS.
      n: samples per prompt. They run as n sequences that share the prompt's full KV blocks
        through the prefix cache (admitted together, the first computes them; the last,
        partial block is recomputed by each sample); sample i draws from its own seed,
        derived from (seed, i). Greedy decoding gives n identical samples.
      logprobs: None, or k >= 0: return, for every generated token, its log-probability and
        those of the k most likely tokens at that position (``Completion.logprobs``).
      prompt_logprobs: None, or k >= 0: the same for every prompt token after the first
        (``Completion.prompt_logprobs``). Such a request does not use the prefix cache (cached
        tokens are not recomputed, so their log-probabilities would be missing), as in vLLM.

    Log-probabilities are those of the model's own distribution, ``log_softmax(logits)`` in
    float32, whatever temperature, top_k and top_p do to the sampling (vLLM's default); the
    sampled token's entry is always present, even when it is not among the top k.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None

    def __post_init__(self):
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) \
                or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, (int, np.integer)) \
                or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and not (isinstance(self.seed, (int, np.integer))
                                          and 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be None or an integer in [0, 2**32), got {self.seed!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1 (samples per prompt), got {self.n!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                  or v < 0):
                raise ValueError(f"{name} must be None or an integer >= 0 (top alternatives per "
                                 f"token), got {v!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving configuration.

    Attributes:
      page_size: tokens per KV block (a power of two in [8, 256]).
      num_pages: pool size in pages; None sizes it from the memory settings.
      kv_memory_bytes: pool size in bytes (used when num_pages is None).
      kv_memory_fraction: else this fraction of the device memory free after the
        weights (devices that report memory; 512 MiB otherwise).
      max_num_seqs: most sequences in one step.
      max_num_batched_tokens: most tokens (prefill + decode) in one step; a
        prompt longer than this is prefilled in chunks.
      max_model_len: longest prompt + generation; None: the model's max_seq_len.
      enable_prefix_caching: reuse cached full blocks across requests.
      attention_impl: "auto", "pallas" or "reference" (not "xla", the full-pass
        training path of ``optgqa_jax.attention``, which paged steps do not have).
      fuse_projections: serve from a copy of the weights with q/k/v and gate/up
        concatenated (``optgqa_jax.fused``): fewer, wider matrix products per
        step. Unfused params are copied into the fused layout (the caller's stay
        untouched); params already fused (``init_params(..., fused=True)``) are
        used as they are, whatever this flag says.
      xla_compiler_options: XLA options for compiling the step programs (passed
        to ``jax.jit(..., compiler_options=...)``); None: the engine's defaults
        for the backend (``optgqa_jax.engine.runner.default_compiler_options``),
        {} for XLA's own defaults.
      command_buffer_max_tokens: with the default XLA options on CUDA, steps of at
        most this many tokens (decode steps of that many sequences, mixed steps
        padded to that many tokens) are compiled with XLA command buffers (CUDA
        graphs) on, larger steps with them off; 0 turns them off everywhere. A
        step of few tokens is bound by the host launching its kernels (~650-714
        per Llama-3-8B step, ~12 µs each on an H100): command buffers raised its
        batch-1 decode from 148 to 161 tokens/s in bfloat16 and from 101 to 213
        with W4 g128 weights, while at 256 sequences they made the step 0.2-0.8 ms
        slower (``experiments/results/h100/``). Sizes between were not measured;
        32 is where the default divides them. Ignored when
        ``xla_compiler_options`` is given (those apply to every step) and with
        ``tensor_parallel_size > 1``.
      stable_step_buffers: keep the step's inputs and sampled tokens in device buffers
        whose addresses do not change from step to step (``ModelRunner``'s
        ``stable_buffers``: an in-place copy of each step's inputs, the tokens written into
        the buffer the next step reads its device-side ids from, a copy for the host; one
        device only). XLA updates a command buffer's recorded commands whenever an address
        they use changes: on an H100 (Llama-3-8B, batch 1, commit 1e1715e) that update took
        0.75-1.5 ms of host time per step. With held buffers the updates stop, but the graph
        launch still took 2.9-3.3 ms of host time, and the engine's batch-1 decode was not
        faster (commit 0cfa333, one H100, three runs alternating on/off/on: bfloat16 168/176/169
        tokens/s, W4 g128 259/288/267, W4S50 222/148/233; ``experiments/results/h100/batch1/``).
        Off by default. XLA keeps temporary buffers at fixed addresses only with
        ``XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP`` (set before jax starts;
        it switches XLA to its VMM allocator), which made the engine slower in that run.
      sorted_kv_writes: write each step's K/V rows into the pool in ascending slot order,
        padding tokens at distinct slots past the pool, with the scatter told its indices are
        sorted and unique (``ModelRunner``'s ``sorted_kv_writes``). Outputs are unchanged. One
        layer's write alone as a jitted call (its dispatch included), on an H100 (commit de8592f,
        ``experiments/results/h100/kv_write_bench_de8592f.md``): 43.4 against 57.6 µs for a
        482-token decode step, 49.1 against 86.1 µs for a 3,890-token mixed step (about 0.45
        and 1.1 ms per Llama-3-8B step). On by default since the engine was timed with it:
        the 1000 x 256/256 workload at 512 sequences (one H100, commit 0819a03, runs
        alternating off/on/on-with-context-buckets twice) took 17.8 s against 18.2 s,
        28,780 and 28,761 against 28,071 and 28,196 total tokens/s, the decode step 21.9
        against 22.5-22.6 ms (``experiments/results/h100/engine_kv_writes_0819a03/``).
      stack_layers: serve the quantized layers and the norm scales stacked across layers, one
        array per weight kind (``optgqa_jax.layer_stack``): a step then takes one argument
        buffer per stacked array for all layers instead of one per layer, and the kernels read
        each layer's rows of the stack in place (their first row read at run time). Launching
        a step costs the host about 1.77 µs per argument buffer (H100, jax 0.11.2,
        ``experiments/results/h100/batch1/dispatch_cost_1e1715e.md``); a 4-bit Llama-3-8B
        step with fused projections reads 14 weight buffers per layer (codes, scales and zero
        points of four projections, two norm scales), 448 of its 517, and 14 in all when
        stacked: an estimated 0.8 ms less launch work in a batch-1 step that the host's
        dispatch bounds. Dense ``QuantizedLinear`` layers with contiguous groups and
        ``PackedBSRLinear`` layers are stacked; float kernels and other layer types stay per
        layer. One device only. Outputs are unchanged. Off by default: timed on an H100
        (0b38b02, ``experiments/results/h100/batch1/bench_quant_batch1_stacked_0b38b02.md``)
        batch-1 W4 decode was 282 tokens/s stacked against 291 unstacked (with the LM head and
        table quantized 294 against 292): with command buffers the step is bound by its
        kernels, not by the launch.
      async_scheduling: launch the next step before reading the current one's
        tokens (they stay on the device and feed it), so the device does not
        wait for the host's scheduling, packing and bookkeeping between steps.
        The next step is the one the synchronous schedule would pick: decodes,
        continued prompt chunks and newly admitted prompts (see
        ``Scheduler.following``). Outputs are the same; a request that ends with a
        stop token or EOS costs one wasted row, and a waiting request may be
        admitted one step later than without it.
        On by default: on an H100 it raised the Llama-3-8B benchmark from 60% to
        73% decode MBU (``experiments/results/h100/``). False runs every step
        synchronously (:meth:`Engine.step` then returns the finished requests of
        the step it ran).
      seed: seeds the per-request seeds of requests that give none.
      seq_buckets: sequence counts that decode steps are padded to (ascending);
        None: powers of two up to max_num_seqs.
      max_logprobs: the largest ``logprobs`` / ``prompt_logprobs`` a request may ask for
        (the static width of the top-k the step computes when any request asks; such steps
        are separate programs, compiled on first use).
      token_buckets: token counts that mixed (prefill) steps are padded to;
        None: powers of two from 16 up to max_num_batched_tokens. Fewer buckets
        mean fewer compiled programs and more padding.
      context_buckets: context lengths in tokens (ascending) that a step's block tables are
        cut to (``ModelRunner``): a step whose longest context fits in a bucket passes tables
        of that many tokens' pages, a static bound the decode kernel picks its tiles by
        (``PagedAttentionConfig.for_backend(max_context=...)``: without ALiBi, 28/4-style
        groups take other tiles up to 2048 tokens). Each bucket is its own set of step
        programs. None: tables always span ``max_model_len``. Timed on an H100 (commit
        0819a03, Llama-3-8B shape, 32/8, the 1000 x 256/256 workload at 512 sequences):
        (1024,) added 0.1-0.4%, within the runs' spread.
      kv_write_kernel: write each step's K/V rows into the pool with
        ``pallas_kernels.kv_write`` (one Triton launch per layer, the pool updated in place)
        instead of XLA's scatter, wherever the attention runs its Pallas kernels (on GPUs
        with ``attention_impl`` "auto" or "pallas"). Outputs are unchanged. Timed on an H100
        (commit ecc39b2, the 1000 x 256/256 workload at 512 sequences, in turns with the
        scatter, twice): 29,102 and 29,232 against 29,266 and 29,109 tokens/s, no difference
        beyond the spread (``experiments/results/h100/engine_kv_write_kernel_ecc39b2/``). Off
        by default. One device only.
      rope_kv_write: on RoPE models with fused q/k/v projections (``optgqa_jax.fused``),
        rotate the queries and keys and write the K/V rows into the pool with
        ``pallas_kernels.rope_kv_write``: one Triton launch per layer straight from the
        projection's output, in place of the queries' and keys' rotations and the two
        scatters, wherever the attention runs its Pallas kernels. Outputs are those of the
        model's own rotation (the same frequencies and float32 arithmetic; tested equal in
        interpret mode). Other layers and models write as ``kv_write_kernel`` says. None (the
        default): on with one device (``tensor_parallel_size=1``), off with several (the pool
        is split by KV heads there); True with several devices is an error. See
        ``add_norm_kernel`` for the measurement behind the default; read the setting that
        applies with :attr:`use_rope_kv_write`.
      add_norm_kernel: run each residual add and the RMS norm after it as one
        ``pallas_kernels.add_rms_norm`` launch (``optgqa_jax.model.Transformer``'s
        ``add_norm_kernel``) wherever the attention runs its Pallas kernels, in place of XLA's
        two or three kernels per site. The same arithmetic; only the order of the norm's
        float32 sum of squares differs. None (the default): on with one device, off with
        several; True with several devices is an error (:attr:`use_add_norm_kernel`). Timed
        together with ``rope_kv_write`` on an H100 (commit 0878888, Llama-3-8B shape, 512
        sequences, in turns with both off, twice;
        ``experiments/results/h100/engine_small_op_defaults_0878888/``): the 1000 x 256/256
        workload 29,900 and 29,789 tokens/s against 29,386 and 29,405, the random-length one
        24,226 and 24,046 against 23,711 and 23,805.
      output_major: names of projections (``optgqa_jax.weight_layout.PROJECTIONS``, e.g.
        ``("gate_up_proj", "qkv_proj")`` with fused projections) whose float kernels the
        engine serves stored transposed, ``[D_out, D_in]`` (``weight_layout.OutputMajorKernel``;
        a copy, the caller's params stay as they are). The function is the same; cuBLAS picks
        its algorithms for the other operand layout, which alone ran the fused gate/up
        product 2-5% faster on an H100 (``weight_layout``'s docstring). Quantized kernels keep
        their layout. The copies are made when the engine starts; the caller's untransposed
        kernels, once freed, leave holes of one kernel each in device memory, which beside a
        pool sized to fill the rest can be too fragmented for XLA's autotuning at warmup
        (``optgqa bench`` draws its random kernels transposed instead). With the add-norm and
        RoPE/K-V-write kernels, gate/up and q/k/v (H100, 512 sequences, in turns, twice):
        30,168 and 30,201 tokens/s against 29,684 and 29,619 with neither on the 1000 x
        256/256 workload at ee1407e (``experiments/results/h100/engine_defaults_ab_ee1407e/``);
        at 0878888 29,944 and 29,946 against 29,900 and 29,789 with those kernels alone, and
        on the random-length workload 23,963 and 23,995 against 24,226 and 24,046
        (``experiments/results/h100/engine_small_op_defaults_0878888/``): no gain beyond the
        spread, so empty (off) by default. One device only, without ``stack_layers``.
      tensor_parallel_size: devices the model is split over (the first ones of
        ``jax.devices()``): weights by ``optgqa_jax.sharding``'s rules and the KV pool by KV
        heads where those are split; the step is one jitted program that XLA partitions
        (GSPMD). Scheduling stays on the host, unchanged.
    """

    page_size: int = 16
    num_pages: Optional[int] = None
    kv_memory_bytes: Optional[int] = None
    kv_memory_fraction: float = 0.85
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: Optional[int] = None
    enable_prefix_caching: bool = True
    attention_impl: str = "auto"
    fuse_projections: bool = False
    xla_compiler_options: Optional[Mapping[str, Any]] = None
    command_buffer_max_tokens: int = 32
    stable_step_buffers: bool = False
    sorted_kv_writes: bool = True
    stack_layers: bool = False
    output_major: tuple[str, ...] = ()
    kv_write_kernel: bool = False
    rope_kv_write: Optional[bool] = None
    add_norm_kernel: Optional[bool] = None
    async_scheduling: bool = True
    seed: int = 0
    seq_buckets: Optional[tuple[int, ...]] = None
    token_buckets: Optional[tuple[int, ...]] = None
    context_buckets: Optional[tuple[int, ...]] = None
    max_logprobs: int = 20
    tensor_parallel_size: int = 1

    def __post_init__(self):
        p = self.page_size
        if not (isinstance(p, int) and 8 <= p <= 256 and p & (p - 1) == 0):
            raise ValueError(f"page_size={p} must be a power of two in [8, 256]")
        for name in ("num_pages", "kv_memory_bytes", "max_model_len"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
                raise ValueError(f"{name} must be None or a positive integer, got {v!r}")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if isinstance(self.max_logprobs, bool) or not isinstance(self.max_logprobs,
                                                                 (int, np.integer)) \
                or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")
        if not isinstance(self.stable_step_buffers, (bool, np.bool_)):
            raise ValueError(f"stable_step_buffers must be True or False, got "
                             f"{self.stable_step_buffers!r}")
        if not isinstance(self.sorted_kv_writes, (bool, np.bool_)):
            raise ValueError(f"sorted_kv_writes must be True or False, got "
                             f"{self.sorted_kv_writes!r}")
        if not isinstance(self.stack_layers, (bool, np.bool_)):
            raise ValueError(f"stack_layers must be True or False, got {self.stack_layers!r}")
        v = self.command_buffer_max_tokens
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"command_buffer_max_tokens must be an integer >= 0, got {v!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.kv_write_kernel, (bool, np.bool_)):
            raise ValueError(f"kv_write_kernel must be True or False, got "
                             f"{self.kv_write_kernel!r}")
        if self.kv_write_kernel and self.tensor_parallel_size > 1:
            raise ValueError("kv_write_kernel=True needs one device (tensor_parallel_size=1): "
                             "the pool is split by KV heads over the devices there")
        if not (self.rope_kv_write is None or isinstance(self.rope_kv_write, (bool, np.bool_))):
            raise ValueError(f"rope_kv_write must be None, True or False, got "
                             f"{self.rope_kv_write!r}")
        if self.rope_kv_write and self.tensor_parallel_size > 1:
            raise ValueError("rope_kv_write=True needs one device (tensor_parallel_size=1): "
                             "the pool is split by KV heads over the devices there")
        if not (self.add_norm_kernel is None
                or isinstance(self.add_norm_kernel, (bool, np.bool_))):
            raise ValueError(f"add_norm_kernel must be None, True or False, got "
                             f"{self.add_norm_kernel!r}")
        if self.add_norm_kernel and self.tensor_parallel_size > 1:
            raise ValueError("add_norm_kernel=True needs one device (tensor_parallel_size=1)")
        object.__setattr__(self, "output_major", check_projection_names(self.output_major))
        if self.output_major and (self.tensor_parallel_size > 1 or self.stack_layers):
            raise ValueError(f"output_major={self.output_major} needs one device "
                             "(tensor_parallel_size=1) and stack_layers=False: neither the "
                             "partition rules nor the layer stacks read transposed kernels")
        if self.stack_layers and self.tensor_parallel_size > 1:
            raise ValueError("stack_layers=True needs one device (tensor_parallel_size=1): the "
                             "stacked arrays have no partition rules")
        for name, top in (("seq_buckets", self.max_num_seqs),
                          ("token_buckets", self.max_num_batched_tokens)):
            v = getattr(self, name)
            if v is None:
                continue
            v = tuple(int(x) for x in v)
            object.__setattr__(self, name, v)
            if not v or list(v) != sorted(set(v)) or v[0] < 1 or v[-1] < top:
                raise ValueError(f"{name} must be ascending positive sizes ending at >= {top}, "
                                 f"got {v}")
        if self.context_buckets is not None:
            v = tuple(int(x) for x in self.context_buckets)
            object.__setattr__(self, "context_buckets", v)
            if not v or list(v) != sorted(set(v)) or v[0] < 1:
                raise ValueError("context_buckets must be ascending positive token counts, "
                                 f"got {v}")
        if self.xla_compiler_options is not None:
            if not isinstance(self.xla_compiler_options, Mapping) or not all(
                    isinstance(k, str) for k in self.xla_compiler_options):
                raise ValueError("xla_compiler_options must be None or a mapping from XLA option "
                                 f"names to values, got {self.xla_compiler_options!r}")
            object.__setattr__(self, "xla_compiler_options", dict(self.xla_compiler_options))
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be a bool, got {self.async_scheduling!r}")
        if self.attention_impl == "xla":
            # The engine only runs paged steps, where "xla" would silently be the reference.
            raise ValueError("attention_impl must be 'auto', 'pallas' or 'reference' for the "
                             "engine, got 'xla': that is the differentiable full-pass attention "
                             "for training; the engine's paged steps have no XLA/cuDNN path")
        if self.attention_impl not in ("auto", "pallas", "reference"):
            raise ValueError(f"attention_impl must be 'auto', 'pallas' or 'reference', got "
                             f"{self.attention_impl!r}")

    @property
    def use_rope_kv_write(self) -> bool:
        """Whether the engine rotates and writes K/V with ``pallas_kernels.rope_kv_write``
        (where the model and attention allow it): ``rope_kv_write``, or, where that is None,
        whether the model runs on one device."""
        return _on_one_device(self.rope_kv_write, self.tensor_parallel_size)

    @property
    def use_add_norm_kernel(self) -> bool:
        """Whether residual adds and norms run as ``pallas_kernels.add_rms_norm`` (where the
        attention runs its Pallas kernels): ``add_norm_kernel``, or, where that is None,
        whether the model runs on one device."""
        return _on_one_device(self.add_norm_kernel, self.tensor_parallel_size)


def _on_one_device(setting: Optional[bool], tensor_parallel_size: int) -> bool:
    """A one-device option's value: the setting where given, else on with one device."""
    return tensor_parallel_size == 1 if setting is None else bool(setting)
