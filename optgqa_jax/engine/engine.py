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
from typing import Optional, Sequence, Union

import jax
import numpy as np
from tqdm.auto import tqdm

from optgqa_jax.config import ModelConfig
from optgqa_jax.engine.block_manager import KVCacheManager
from optgqa_jax.engine.config import EngineConfig, SamplingParams
from optgqa_jax.engine.runner import ModelRunner, page_bytes
from optgqa_jax.engine.scheduler import Request, Scheduler
from optgqa_jax.fused import fuse_projections, is_fused
from optgqa_jax.model import check_params_match
from optgqa_jax.validation import check_prompt_ids

Prompt = Union[str, Sequence[int]]


@dataclasses.dataclass
class Completion:
    """A finished request.

    Attributes:
      request_id: the id given to or returned by ``add_request``.
      prompt_token_ids: the prompt.
      token_ids: generated ids (a stop/EOS token that ended it is included).
      text: ``token_ids`` decoded (None without a tokenizer).
      finish_reason: "stop" (stop token or EOS) or "length" (max_tokens or max_model_len).
      ttft: seconds from arrival to the first generated token.
      latency: seconds from arrival to the last token.
      num_cached_tokens: prompt tokens served from the prefix cache.
      num_preemptions: times the request was preempted and recomputed.
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


@dataclasses.dataclass
class StepRecord:
    """One device step (``Engine.record_steps``): what ran and how long it took on the host clock."""

    decode_only: bool
    num_seqs: int
    num_tokens: int
    context_tokens: int  # K/V tokens the step's attention read
    seconds: float


@dataclasses.dataclass
class EngineStats:
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

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


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
        if config.fuse_projections and not is_fused(params):
            params = fuse_projections(cfg, params)
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
                                  compiler_options=config.xla_compiler_options)
        self._ids = itertools.count()
        self._seed_rng = np.random.default_rng(config.seed)
        self._steps = 0
        self._requests: dict[str, Request] = {}
        self.peak_pages_used = 0
        self.record_steps = False  # set True to log every step in self.step_log
        self.step_log: list[StepRecord] = []

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
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**32))
        req = Request(request_id, ids, params, seed, getattr(self.tokenizer, "eos_id", None))
        self._requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Queue a request; returns its id. Raises ValueError (nothing queued) if it can never run:
        empty prompt, ids outside the vocabulary, longer than max_model_len, or more pages than
        the whole pool."""
        ids, params = self._prepare(prompt, params, "prompt")
        return self._enqueue(ids, params, request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Completion]:
        """Run one scheduling step on the device; returns the requests that finished in it."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if self.scheduler.has_unfinished():
                raise RuntimeError("no request could be scheduled; the pool is too small for "
                                   "the waiting requests")
            return []
        self.peak_pages_used = max(self.peak_pages_used, self.kv.pool.num_used)
        inputs, decode_only, size = self.runner.build(scheduled, self.kv.tables)
        t0 = time.perf_counter()
        sampled = self.runner.run(inputs, decode_only, size)  # blocks until the tokens are back
        if self.record_steps:
            self.step_log.append(StepRecord(
                decode_only, len(scheduled), sum(s.num_new for s in scheduled),
                int(inputs.context_lens.sum()), time.perf_counter() - t0))
        self._steps += 1
        finished = self.scheduler.update(scheduled, sampled[:len(scheduled)].tolist())
        return [self._completion(r) for r in finished]

    def _completion(self, req: Request) -> Completion:
        del self._requests[req.request_id]
        text = self.tokenizer.decode(req.output_ids) if self.tokenizer is not None else None
        return Completion(req.request_id, req.prompt_ids, list(req.output_ids), text,
                          req.finish_reason, req.first_token_time - req.arrival_time,
                          req.finish_time - req.arrival_time, req.num_cached_tokens or 0,
                          req.num_preemptions)

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 progress: Optional[bool] = None) -> list[Completion]:
        """Generate for a batch of prompts (strings with a tokenizer, or token-id lists).

        All prompts are validated before any is queued. Returns completions in
        prompt order. `progress` shows a tqdm bar (default: for more than 8 prompts).
        """
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        prepared = [self._prepare(p, sp, f"prompts[{i}]")
                    for i, (p, sp) in enumerate(zip(prompts, params))]
        ids = [self._enqueue(i, sp, None) for i, sp in prepared]
        results: dict[str, Completion] = {}
        show = progress if progress is not None else len(prompts) > 8
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not show) as bar:
            while len(results) < len(ids):
                for c in self.step():
                    results[c.request_id] = c
                    bar.update(1)
        return [results[i] for i in ids]

    def warmup(self) -> None:
        """Compile every step shape bucket now, so serving never compiles later."""
        self.runner.warmup()

    @property
    def stats(self) -> EngineStats:
        pool = self.kv.pool
        return EngineStats(num_pages=self.num_pages, pages_used=pool.num_used,
                           pages_free=pool.num_free, page_size=self.config.page_size,
                           prefix_queries=self.kv.prefix_queries, prefix_hits=self.kv.prefix_hits,
                           evictions=pool.evictions, preemptions=self.scheduler.num_preemptions,
                           steps=self._steps, compiles=self.runner.compiles)
