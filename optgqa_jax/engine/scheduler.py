"""Continuous-batching scheduler (host side).

Each step it picks which requests run and how many of their tokens are
computed, under ``max_num_seqs`` and ``max_num_batched_tokens``:

1. running requests first, in admission order — one token for a decoding
   request, the next chunk for a request whose prompt is still being prefilled;
2. then waiting requests, oldest first, each reusing its longest cached prefix.

A block enters the prefix cache as soon as the step that fills it is scheduled (its tokens
are all known then: prompt tokens, or generated ones the host already has), not when the step
has run. So requests admitted in the same step share a prefix that an earlier one in the step
computes: within each layer the step writes every token's K/V to the pool before any attention
reads it. Blocks filled by decode tokens not yet read back (asynchronous scheduling) are
registered when their tokens arrive.

When the pool cannot hold a running request's next tokens, the most recently
admitted request is preempted: its blocks are freed and it goes back to the
front of the queue to be recomputed later (prompt plus the tokens it already
generated). Sampling keys depend only on (seed, position), so preemption never
changes an output. No request is admitted in a step that preempted.

With asynchronous scheduling the engine asks for the next step before the step in flight has
returned its tokens (:meth:`Scheduler.following`): the same choice, made one step early, that
never preempts.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from typing import Optional

from optgqa_jax.engine.block_manager import KVCacheManager
from optgqa_jax.engine.config import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its progress."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    eos_id: Optional[int]
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the pool
    status: Status = Status.WAITING
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    finish_reason: Optional[str] = None
    num_cached_tokens: Optional[int] = None  # prefix-cache hit at first admission
    num_preemptions: int = 0
    parent: Optional[str] = None  # the request id of an n > 1 request this sample belongs to
    index: int = 0  # the sample's index
    logprobs: list = dataclasses.field(default_factory=list)  # per generated token (if asked)
    prompt_logprobs: Optional[list] = None  # per prompt token (if asked)

    @property
    def all_ids(self) -> list[int]:
        """The prompt's ids followed by the tokens generated so far."""
        return self.prompt_ids + self.output_ids

    def token_at(self, position: int) -> int:
        """The prompt or generated id at `position` (without building ``all_ids``)."""
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_ids) + len(self.output_ids)


@dataclasses.dataclass
class Scheduled:
    """`num_new` tokens of `request`, from position `start`, are computed this step."""

    request: Request
    start: int
    num_new: int


class Scheduler:
    """Decides each step's work (see the module docstring); owns the waiting and running queues."""

    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        """Queue a validated request (first come, first served)."""
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.waiting or self.running)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.num_computed = 0
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> list[Scheduled]:
        """Pick this step's (request, tokens) pairs, growing or admitting their block tables;
        may preempt. Running requests come first, in admission order."""
        budget = self.max_num_batched_tokens
        out: list[Scheduled] = []
        preempted = False
        idx = 0
        while idx < len(self.running) and budget > 0:
            req = self.running[idx]
            num_new = min(req.num_tokens - req.num_computed, budget)
            while not self.kv.grow(req.request_id, req.num_computed + num_new):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break
            out.append(Scheduled(req, req.num_computed, num_new))
            self._register_scheduled(req, req.num_computed + num_new)
            budget -= num_new
            idx += 1
        if not preempted:
            out += self.admit(budget, self.max_num_seqs - len(self.running))
        return out

    def following(self, scheduled: list[Scheduled]) -> Optional[list[Scheduled]]:
        """The step after ``scheduled`` (the step in flight), chosen before its tokens are read.

        That is possible when ``scheduled`` holds all the running requests, in order. The
        result is what :meth:`schedule` would pick once their tokens are in (asynchronous
        scheduling):

        * each request that ``scheduled`` samples for decodes the token it samples (its id
          stays on the device), unless that token ends it by length;
        * a request whose prompt chunk ``scheduled`` computes without sampling continues its
          prompt (those ids are known), as far as the token budget goes;
        * waiting requests are admitted into the seats and tokens left (:meth:`admit`).

        A request that the step in flight ends with a stop token or EOS runs one wasted row,
        whose token is dropped; its seat is filled one step later than :meth:`schedule` would
        fill it. Returns None (then the step after runs synchronously) if a request would need
        a page the pool does not have (this never preempts), if the budget runs out before
        every running request is served, or if there is nothing to run.
        """
        if len(scheduled) != len(self.running):
            return None
        budget = self.max_num_batched_tokens
        out: list[Scheduled] = []
        for s in scheduled:
            req = s.request
            if req.status is not Status.RUNNING or budget <= 0:
                return None
            done_after = s.start + s.num_new
            if done_after < req.num_tokens:   # a prompt chunk: its sample is unused
                num_new = min(req.num_tokens - done_after, budget)
                if not self.kv.grow(req.request_id, done_after + num_new):
                    return None
                out.append(Scheduled(req, done_after, num_new))
                self._register_scheduled(req, done_after + num_new)
                budget -= num_new
                continue
            if (len(req.output_ids) + 1 >= req.params.max_tokens
                    or req.num_tokens + 1 >= self.max_model_len):
                continue  # the token in flight ends it by length
            # the token in flight sits at position req.num_tokens
            if not self.kv.grow(req.request_id, req.num_tokens + 1):
                return None
            out.append(Scheduled(req, req.num_tokens, 1))
            budget -= 1
        out += self.admit(budget, self.max_num_seqs - len(out))
        return out or None

    def admit(self, budget: int, seats: int) -> list[Scheduled]:
        """Admit waiting requests, first come first served, into at most ``seats`` new seats
        and ``budget`` tokens (a prompt longer than what is left is chunked); never preempts:
        admission stops at the first request the free blocks cannot hold. Used by
        :meth:`schedule` and by the engine's asynchronous scheduling, which admits before the
        step in flight has ended."""
        out: list[Scheduled] = []
        while self.waiting and budget > 0 and seats > 0:
            req = self.waiting[0]
            ids = req.all_ids
            # prompt log-probabilities need every prompt token computed: no prefix cache
            use_cache = req.params.prompt_logprobs is None
            cached = len(self.kv.cached_prefix(ids)) * self.kv.block_size if use_cache else 0
            num_new = min(len(ids) - cached, budget)
            got = self.kv.admit(req.request_id, ids, cached + num_new, use_cache=use_cache)
            if got is None:
                break  # not enough free blocks: wait for running requests to finish
            self.waiting.popleft()
            req.num_computed = got
            if req.num_cached_tokens is None:
                req.num_cached_tokens = got
            req.status = Status.RUNNING
            self.running.append(req)
            out.append(Scheduled(req, got, num_new))
            self._register_scheduled(req, got + num_new)
            budget -= num_new
            seats -= 1
        return out

    def _register_scheduled(self, req: Request, computed_after: int) -> None:
        """Enter into the prefix cache the blocks this step fills with known tokens."""
        known = min(computed_after, req.num_tokens)
        if self.kv.has_unregistered_full_blocks(req.request_id, known):
            self.kv.register_full_blocks(req.request_id, req.all_ids, known)

    def update(self, scheduled: list[Scheduled], sampled: list[int]) -> list[Request]:
        """Apply a step's results; returns the requests that finished."""
        now = time.perf_counter()
        finished = []
        for item, token in zip(scheduled, sampled):
            req = item.request
            if req.status is not Status.RUNNING:
                continue  # ended (stop token) while this step ran speculatively: drop its token
            req.num_computed = item.start + item.num_new
            if self.kv.has_unregistered_full_blocks(req.request_id, req.num_computed):
                self.kv.register_full_blocks(req.request_id, req.all_ids, req.num_computed)
            if req.num_computed < req.num_tokens:
                continue  # a prefill chunk: more prompt to go, the sample is not used
            req.output_ids.append(int(token))
            if req.first_token_time is None:
                req.first_token_time = now
            p = req.params
            reason = None
            if int(token) in p.stop_token_ids or (
                    not p.ignore_eos and req.eos_id is not None and int(token) == req.eos_id):
                reason = "stop"
            elif len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
                reason = "length"
            if reason is not None:
                req.finish_reason, req.finish_time, req.status = reason, now, Status.FINISHED
                self.running.remove(req)
                self.kv.free(req.request_id)
                finished.append(req)
        return finished
