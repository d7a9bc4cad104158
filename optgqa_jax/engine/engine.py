"""The serving engine: paged KV pool, prefix caching, continuous batching, on-device sampling.

Typical use::

    engine = og.Engine(cfg, params, og.EngineConfig(max_num_seqs=32), tokenizer=tok)
    outs = engine.generate(["The capital of France is"], og.SamplingParams(temperature=0))
    print(outs[0].text, outs[0].ttft, engine.stats)

Research loops drive it step by step::

    rid = engine.add_request(prompt_ids, og.SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for done in engine.step():
            ...
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Iterator, Optional, Sequence, Union

import jax
import numpy as np
from tqdm.auto import tqdm

from optgqa_jax.config import ModelConfig
from optgqa_jax.engine.block_manager import KVCacheManager
from optgqa_jax.engine.config import EngineConfig, SamplingParams
from optgqa_jax.engine.runner import ModelRunner, page_bytes
from optgqa_jax.engine.scheduler import Request, Scheduler, Status
from optgqa_jax.fused import fuse_projections, is_fused
from optgqa_jax.weight_layout import output_major_params
from optgqa_jax.layer_stack import stack_layers
from optgqa_jax.model import check_params_match
from optgqa_jax.quant.linear import prepare_for_kernels
from optgqa_jax.validation import check_prompt_ids
from pallas_kernels._common import backend

Prompt = Union[str, Sequence[int]]


@dataclasses.dataclass
class Completion:
    """A finished request.

    Attributes:
      request_id: the id given to or returned by ``add_request``.
      prompt_token_ids: the prompt.
      token_ids: generated ids (a stop/EOS token that ended it is included).
      text: ``token_ids`` decoded (None without a tokenizer).
      finish_reason: "stop" (stop token or EOS), "length" (max_tokens or max_model_len) or
        "abort" (:meth:`Engine.abort`).
      ttft: seconds from arrival to the first generated token (None: aborted before one).
      latency: seconds from arrival to the last token (to the abort for aborted requests).
      num_cached_tokens: prompt tokens served from the prefix cache.
      num_preemptions: times the request was preempted and recomputed.
      index: the sample's index (0 .. n-1) for ``SamplingParams(n=...)``.
      logprobs: with ``SamplingParams(logprobs=k)``, per generated token a dict
        ``{token id: log-probability}`` holding the sampled token and the k most likely ones.
      prompt_logprobs: with ``SamplingParams(prompt_logprobs=k)``, per prompt token such a
        dict for the token itself and the k most likely at its position (None for the first
        token, which nothing predicts).
      samples: with n > 1, the n sample completions in index order (the fields above are
        sample 0's, except ttft, the earliest, and latency, the latest); None for n == 1.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: Optional[str]
    finish_reason: str
    ttft: float
    latency: float
    num_cached_tokens: int
    num_preemptions: int
    index: int = 0
    samples: Optional[list["Completion"]] = None
    logprobs: Optional[list[dict[int, float]]] = None
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None


@dataclasses.dataclass
class StreamOutput:
    """New tokens of one sample of a streamed request (:meth:`Engine.stream`).

    Attributes:
      request_id: the request (one per prompt).
      prompt_index: the prompt's position in the call.
      index: the sample (0 .. n-1).
      token_ids: tokens generated since the previous output of this sample (may be empty
        only when ``finished``).
      finished: this sample is done (its tokens so far are all it has).
      completion: on the last output of the request (all samples done), its Completion.
    """

    request_id: str
    prompt_index: int
    index: int
    token_ids: list[int]
    finished: bool
    completion: Optional[Completion] = None


@dataclasses.dataclass
class StepRecord:
    """One device step (``Engine.record_steps``): what ran and how long it took on the host clock."""

    decode_only: bool
    num_seqs: int
    num_tokens: int
    context_tokens: int  # K/V tokens the step's attention read
    seconds: float
    # launched before the previous step's tokens were read (asynchronous scheduling)
    speculative: bool = False


@dataclasses.dataclass
class EngineStats:
    """Counters of an :class:`Engine` (``engine.stats``, a snapshot).

    Attributes:
      num_pages, pages_used, pages_free, page_size: the KV pool's pages (``page_size`` tokens
        each), those held by requests and those free (cached prefix pages included).
      prefix_queries, prefix_hits: prompt tokens looked up in the prefix cache, and of those
        the tokens found cached (their K/V not computed again).
      evictions: cached pages taken for new contents.
      preemptions: requests stopped to free pages (resumed later, outputs unchanged).
      steps: steps run; compiles: distinct step programs compiled so far.
      speculative_steps: steps launched before the previous step's tokens were read
        (``EngineConfig.async_scheduling``).
    """

    num_pages: int
    pages_used: int
    pages_free: int
    page_size: int
    prefix_queries: int
    prefix_hits: int
    evictions: int
    preemptions: int
    steps: int
    compiles: int
    speculative_steps: int = 0  # steps launched before the previous one's tokens were read

    @property
    def prefix_hit_rate(self) -> float:
        """Prefix-cache hits over queries (0.0 before any query)."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


@dataclasses.dataclass
class _InFlight:
    """A launched step whose tokens the host has not read yet."""

    scheduled: list  # [Scheduled]
    tokens: jax.Array  # int32 [max_rows] on the device
    decode_only: bool
    context_tokens: int
    launched: float  # host clock at dispatch
    extras: Optional[dict] = None  # log-probability outputs of the step (runner._step)
    token_pos: Optional[np.ndarray] = None  # positions of the packed tokens (prompt logprobs)
    speculative: bool = False  # launched before the previous step's tokens were read


def _device_free_bytes() -> Optional[int]:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends do not report memory
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


class Engine:
    """Continuous-batching generation over a paged KV pool (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, params: dict, config: Optional[EngineConfig] = None,
                 tokenizer=None):
        config = config or EngineConfig()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        check_params_match(cfg, params)
        mesh = None
        if config.tensor_parallel_size > 1:  # checked before any weight moves
            from optgqa_jax import sharding
            sharding.check_tensor_parallel(cfg, config.tensor_parallel_size)
            mesh = sharding.make_mesh(1, config.tensor_parallel_size)
        if config.fuse_projections and not is_fused(params):
            params = fuse_projections(cfg, params)
        if config.output_major:  # chosen float kernels stored [D_out, D_in] (weight_layout)
            params = output_major_params(params, config.output_major)
        if backend() != "cpu":  # act-order rows sorted once, for the quantized matmul kernel
            params = prepare_for_kernels(params)
        if config.stack_layers:  # one argument buffer per weight kind (layer_stack)
            params = stack_layers(params, cfg.n_layers)
        self.cfg, self.params, self.config, self.tokenizer = cfg, params, config, tokenizer
        self.max_model_len = config.max_model_len or cfg.max_seq_len
        if self.max_model_len > cfg.max_seq_len:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_seq_len={cfg.max_seq_len}")
        self.num_pages = self._size_pool(config)
        self.kv = KVCacheManager(self.num_pages, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=self.max_model_len)
        self.runner = ModelRunner(cfg, params, num_pages=self.num_pages,
                                  page_size=config.page_size, max_num_seqs=config.max_num_seqs,
                                  max_num_batched_tokens=config.max_num_batched_tokens,
                                  max_model_len=self.max_model_len, impl=config.attention_impl,
                                  seq_buckets=config.seq_buckets,
                                  token_buckets=config.token_buckets,
                                  compiler_options=config.xla_compiler_options,
                                  command_buffer_max_tokens=config.command_buffer_max_tokens,
                                  max_logprobs=config.max_logprobs, mesh=mesh,
                                  stable_buffers=config.stable_step_buffers,
                                  sorted_kv_writes=config.sorted_kv_writes,
                                  kv_write_kernel=config.kv_write_kernel,
                                  rope_kv_write=config.use_rope_kv_write,
                                  add_norm_kernel=config.use_add_norm_kernel,
                                  context_buckets=config.context_buckets)
        self._ids = itertools.count()
        self._seed_rng = np.random.default_rng(config.seed)
        self._steps = 0
        self._requests: dict[str, Request] = {}
        self.peak_pages_used = 0
        self.record_steps = False  # set True to log every step in self.step_log
        self.step_log: list[StepRecord] = []
        self._inflight: Optional[_InFlight] = None  # a launched step not yet read (async)
        self._speculative_steps = 0
        self._unclaimed: list[Completion] = []  # see generate()
        self._groups: dict[str, dict] = {}  # n > 1 requests: their samples, finished ones
        self._aborted: dict[str, Completion] = {}  # aborted requests, until stream() ends
        self._last_done = 0.0

    def _size_pool(self, config: EngineConfig) -> int:
        per_page = page_bytes(self.cfg, config.page_size)
        if config.num_pages is not None:
            return config.num_pages
        if config.kv_memory_bytes is not None:
            budget = config.kv_memory_bytes
        else:
            free = _device_free_bytes()
            budget = int(free * config.kv_memory_fraction) if free else 512 << 20
        pages = budget // per_page
        if pages < 1:
            raise ValueError(f"a KV budget of {budget} bytes holds no page of {per_page} bytes")
        return int(pages)

    # ------------------------------------------------------------------ requests
    def _to_ids(self, prompt: Prompt, name: str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{name} is a string but the engine has no tokenizer; pass token "
                                 "ids or give Engine a tokenizer")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        check_prompt_ids(ids, self.cfg.vocab_size, name)
        return ids

    def _prepare(self, prompt: Prompt, params: Optional[SamplingParams], name: str):
        """Validate one request; returns (ids, params). Raises before anything is queued."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        for field in ("logprobs", "prompt_logprobs"):
            k = getattr(params, field)
            if k is not None and k > self.config.max_logprobs:
                raise ValueError(f"{name}: SamplingParams.{field}={k} exceeds "
                                 f"EngineConfig.max_logprobs={self.config.max_logprobs}")
        ids = self._to_ids(prompt, name)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{name} of {len(ids)} tokens leaves no room to generate within "
                             f"max_model_len={self.max_model_len}")
        needed = self.kv.blocks_needed(min(len(ids) + params.max_tokens, self.max_model_len))
        if needed > self.num_pages:
            raise ValueError(f"{name} of {len(ids)} tokens plus max_tokens={params.max_tokens} "
                             f"needs {needed} KV pages but the pool has {self.num_pages}")
        return ids, params

    def _enqueue(self, ids: list[int], params: SamplingParams, request_id: Optional[str]) -> str:
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._requests or request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**32))
        eos = getattr(self.tokenizer, "eos_id", None)
        if params.n == 1:
            req = Request(request_id, ids, params, seed, eos)
            self._requests[request_id] = req
            self.scheduler.add(req)
            return request_id
        # n samples: n sequences, admitted together so that they share the prompt's blocks
        children = []
        for i in range(params.n):
            child_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
            req = Request(f"{request_id}#{i}", ids, params, child_seed, eos)
            req.parent, req.index = request_id, i
            self._requests[req.request_id] = req
            self.scheduler.add(req)
            children.append(req)
        self._groups[request_id] = {"children": children, "done": {}}
        return request_id

    def abort(self, request_id: str) -> Optional[Completion]:
        """Stop a request now: it leaves the queue or the running batch and its KV pages are
        freed (a step already in flight finishes, and its token for the request is dropped).
        With n > 1 every sample stops. Returns the request's Completion so far (finish_reason
        "abort"), or None for an unknown or already finished request. For loops that drive
        :meth:`step` or :meth:`stream`; :meth:`generate` returns only when its requests end."""
        request_id = str(request_id)
        group = self._groups.pop(request_id, None)
        reqs = group["children"] if group else [self._requests.get(request_id)]
        reqs = [r for r in reqs if r is not None and r.request_id in self._requests]
        if not reqs:
            return None
        now = time.perf_counter()
        for req in reqs:
            if req.status is Status.WAITING:
                self.scheduler.waiting.remove(req)
            elif req.status is Status.RUNNING:
                self.scheduler.running.remove(req)
                self.kv.free(req.request_id)
            req.finish_reason, req.finish_time, req.status = "abort", now, Status.FINISHED
        done = [self._completion(r, grouped=False) for r in reqs]
        if group is None:
            result = done[0]
        else:
            for c in done:
                group["done"][c.index] = c
            result = self._group_completion(request_id, group)
        self._aborted[request_id] = result  # for stream(); dropped when it ends
        return result

    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Queue a request; returns its id. Raises ValueError (nothing queued) if it can never run:
        empty prompt, ids outside the vocabulary, longer than max_model_len, or more pages than
        the whole pool."""
        ids, params = self._prepare(prompt, params, "prompt")
        return self._enqueue(ids, params, request_id)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting, running or finished but not yet returned by step()."""
        return (self.scheduler.has_unfinished() or self._inflight is not None
                or bool(self._unclaimed))

    def step(self) -> list[Completion]:
        """Run one scheduling step on the device; returns the requests that finished (and
        those queued with :meth:`add_request` that finished during a :meth:`generate` call).

        With ``EngineConfig.async_scheduling``, the next step is launched
        before this one's tokens are read (see :meth:`Scheduler.following`), so a step
        returns the requests that finished in the step launched by the previous
        call, and the device never waits for the host's bookkeeping.
        """
        unclaimed, self._unclaimed = self._unclaimed, []  # finished during a generate() call
        current, self._inflight = self._inflight, None
        if current is None:
            scheduled = self.scheduler.schedule()
            if not scheduled:
                if self.scheduler.has_unfinished():
                    raise RuntimeError("no request could be scheduled; the pool is too small for "
                                       "the waiting requests")
                return unclaimed
            current = self._launch(scheduled)
        if self.config.async_scheduling:
            following = self.scheduler.following(current.scheduled)
            if following is not None:
                self._inflight = self._launch(following, after=current)
                self._speculative_steps += 1
        return unclaimed + self._complete(current)

    def _launch(self, scheduled: list, after: Optional[_InFlight] = None) -> _InFlight:
        """Build and dispatch a step (asynchronously). With `after`, requests that `after`
        samples for take their next token from its device output."""
        self.peak_pages_used = max(self.peak_pages_used, self.kv.pool.num_used)
        from_prev = None
        if after is not None:  # the rows of `after` that sample a token (not a prompt chunk)
            from_prev = {s.request.request_id: row for row, s in enumerate(after.scheduled)
                         if s.start + s.num_new == s.request.num_tokens}
        inputs, decode_only, size = self.runner.build(scheduled, self.kv.tables, from_prev)
        logprobs = any(s.request.params.logprobs is not None for s in scheduled)
        prompt_lp = any(s.request.params.prompt_logprobs is not None
                        and s.start < len(s.request.prompt_ids) for s in scheduled)
        t0 = time.perf_counter()
        tokens, extras = self.runner.dispatch(inputs, decode_only, size,
                                              after.tokens if after is not None else None,
                                              logprobs=logprobs, prompt_logprobs=prompt_lp)
        return _InFlight(scheduled, tokens, decode_only, int(inputs.context_lens.sum()), t0,
                         extras, inputs.positions if prompt_lp else None, after is not None)

    def _complete(self, step: _InFlight) -> list[Completion]:
        """Wait for a launched step's tokens and apply them."""
        sampled = np.asarray(step.tokens)  # blocks until the step is done
        done = time.perf_counter()
        if self.record_steps:  # device time: from launch, or from the previous step's end
            self.step_log.append(StepRecord(
                step.decode_only, len(step.scheduled), sum(s.num_new for s in step.scheduled),
                step.context_tokens, done - max(step.launched, self._last_done),
                step.speculative))
        self._last_done = done
        self._steps += 1
        if step.extras is not None:
            self._record_logprobs(step, sampled)
        finished = self.scheduler.update(step.scheduled, sampled[:len(step.scheduled)].tolist())
        return [c for c in (self._completion(r) for r in finished) if c is not None]

    def _record_logprobs(self, step: _InFlight, sampled: np.ndarray) -> None:
        """Attach a step's log-probabilities to its requests (before ``Scheduler.update``
        appends the sampled tokens, with the same rule for which rows produce a token)."""
        def entry(token, lp, ids, lps, k):
            d = {int(i): float(v) for i, v in zip(ids[:k], lps[:k])}
            d[int(token)] = float(lp)
            return d

        lp, ids, lps = (np.asarray(a) for a in step.extras["sample"])
        for row, item in enumerate(step.scheduled):
            req = item.request
            k = req.params.logprobs
            if (k is not None and req.status is Status.RUNNING
                    and item.start + item.num_new >= req.num_tokens):
                req.logprobs.append(entry(sampled[row], lp[row], ids[row], lps[row], k))
        if "prompt" not in step.extras:
            return
        plp, pids, plps = (np.asarray(a) for a in step.extras["prompt"])
        t = 0
        for item in step.scheduled:
            req, k = item.request, item.request.params.prompt_logprobs
            if k is not None and req.status is Status.RUNNING:
                n_prompt = len(req.prompt_ids)
                if req.prompt_logprobs is None:
                    req.prompt_logprobs = [None] * n_prompt
                for i in range(t, t + item.num_new):
                    nxt = int(step.token_pos[i]) + 1
                    if nxt < n_prompt:  # this token's logits predict prompt token `nxt`
                        req.prompt_logprobs[nxt] = entry(req.prompt_ids[nxt], plp[i], pids[i],
                                                         plps[i], k)
            t += item.num_new

    def drain(self) -> list[Completion]:
        """Finish the step still in flight, if any (asynchronous scheduling)."""
        current, self._inflight = self._inflight, None
        return self._complete(current) if current is not None else []

    def _completion(self, req: Request, grouped: bool = True) -> Optional[Completion]:
        """The Completion of a finished request; for a sample of an n > 1 request, None until
        the last sample ends, then the request's Completion (with every sample)."""
        del self._requests[req.request_id]
        text = self.tokenizer.decode(req.output_ids) if self.tokenizer is not None else None
        parent = getattr(req, "parent", None)
        ttft = (None if req.first_token_time is None
                else req.first_token_time - req.arrival_time)
        c = Completion(parent or req.request_id, req.prompt_ids, list(req.output_ids), text,
                       req.finish_reason, ttft, req.finish_time - req.arrival_time,
                       req.num_cached_tokens or 0, req.num_preemptions,
                       index=getattr(req, "index", 0),
                       logprobs=(None if req.params.logprobs is None
                                 else list(req.logprobs[:len(req.output_ids)])),
                       prompt_logprobs=req.prompt_logprobs)
        if parent is None or not grouped:
            return c
        group = self._groups[parent]
        group["done"][c.index] = c
        if len(group["done"]) < len(group["children"]):
            return None
        del self._groups[parent]
        return self._group_completion(parent, group)

    @staticmethod
    def _group_completion(request_id: str, group: dict) -> Completion:
        samples = [group["done"][i] for i in sorted(group["done"])]
        first = samples[0]
        ttfts = [c.ttft for c in samples if c.ttft is not None]
        return dataclasses.replace(first, request_id=request_id, samples=samples,
                                   ttft=min(ttfts) if ttfts else None,
                                   latency=max(c.latency for c in samples))

    def _submit(self, prompts, params) -> list[str]:
        """Validate every prompt (and its params), then queue them all; returns their ids."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        prepared = [self._prepare(p, sp, f"prompts[{i}]")
                    for i, (p, sp) in enumerate(zip(prompts, params))]
        return [self._enqueue(i, sp, None) for i, sp in prepared]

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 progress: Optional[bool] = None) -> list[Completion]:
        """Generate for a batch of prompts (strings with a tokenizer, or token-id lists).

        All prompts are validated before any is queued. Returns completions in
        prompt order. `progress` shows a tqdm bar (default: for more than 8 prompts).
        """
        ids = self._submit(prompts, params)
        results: dict[str, Completion] = {}
        wanted = set(ids)
        show = progress if progress is not None else len(ids) > 8
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not show) as bar:
            while len(results) < len(ids):
                for c in self.step():
                    if c.request_id in wanted:
                        results[c.request_id] = c
                        bar.update(1)
                    else:  # a request queued with add_request: the next step() returns it
                        self._unclaimed.append(c)
        if not self.scheduler.has_unfinished():
            self.drain()  # a speculative step of requests that all ended: nothing comes of it
        return [results[i] for i in ids]

    def stream(self, prompts: Union[Prompt, Sequence[Prompt]],
               params: Union[SamplingParams, Sequence[SamplingParams], None] = None
               ) -> Iterator[StreamOutput]:
        """Like :meth:`generate`, but yield each sample's new tokens as steps produce them.

        Every prompt is validated before any is queued. Each :class:`StreamOutput` carries the
        tokens a sample gained since its previous output; a sample's outputs concatenate to
        its final ``token_ids`` (tokens are never taken back: preemption recomputes, it does
        not resample). The last output of a request carries its Completion. With
        asynchronous scheduling, tokens arrive one step after they are sampled. Calling
        :meth:`abort` on a streamed request ends its samples (``finished``, reason "abort").
        """
        ids = self._submit(prompts, params)
        samples = []  # (request id, prompt index, Request) of every sample
        for k, rid in enumerate(ids):
            reqs = self._groups[rid]["children"] if rid in self._groups else [self._requests[rid]]
            samples += [(rid, k, r) for r in reqs]
        reported = {id(r): 0 for _, _, r in samples}
        ended: set[int] = set()
        pending = {rid: k for k, rid in enumerate(ids)}
        completions: dict[str, Completion] = {}

        def deltas():
            for rid, k, r in samples:
                if id(r) in ended:
                    continue
                new = r.output_ids[reported[id(r)]:]
                finished = r.status is Status.FINISHED
                if not new and not finished:
                    continue
                reported[id(r)] += len(new)
                if finished:
                    ended.add(id(r))
                last = finished and all(id(x) in ended for q, _, x in samples if q == rid)
                done = completions.get(rid) or self._aborted.get(rid)
                yield StreamOutput(rid, k, getattr(r, "index", 0), list(new), finished,
                                   done if last else None)

        while pending:
            for c in self.step():
                if c.request_id in pending:
                    completions[c.request_id] = c
                else:
                    self._unclaimed.append(c)
            for out in deltas():
                if out.finished and all(id(x) in ended for q, _, x in samples
                                        if q == out.request_id):
                    pending.pop(out.request_id, None)
                yield out
            if not self.has_unfinished():
                break
        for rid in ids:
            self._aborted.pop(rid, None)
        if not self.scheduler.has_unfinished():
            self.drain()

    def warmup(self, sampling: bool = True) -> None:
        """Compile every step shape bucket now, so serving never compiles later.

        Args:
          sampling: also compile the sampling programs (requests with ``temperature > 0``).
            False compiles only the greedy ones, half the programs, for a workload known to
            be all greedy (a benchmark); a sampling request then compiles its program on
            first use. Steps that return log-probabilities are separate programs, compiled
            on first use either way.
        """
        if not isinstance(sampling, bool):
            raise TypeError(f"sampling must be a bool, got {sampling!r}")
        self.runner.warmup(sampling)

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the pool, prefix cache, scheduler and compile counters
        (:class:`EngineStats`)."""
        pool = self.kv.pool
        return EngineStats(num_pages=self.num_pages, pages_used=pool.num_used,
                           pages_free=pool.num_free, page_size=self.config.page_size,
                           prefix_queries=self.kv.prefix_queries, prefix_hits=self.kv.prefix_hits,
                           evictions=pool.evictions, preemptions=self.scheduler.num_preemptions,
                           steps=self._steps, compiles=self.runner.compiles,
                           speculative_steps=self._speculative_steps)
