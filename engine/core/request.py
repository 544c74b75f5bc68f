"""Request state (owned by the scheduler) and the per-request result users receive."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Optional

from engine.core.detokenizer import IncrementalDetokenizer
from engine.core.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class DecodeCounters:
    """Speculation counters, kept per request and summed per engine."""
    # Decode steps, and tokens they produced (accepted candidates + the bonus token).
    num_decode_steps: int = 0
    num_decode_tokens: int = 0
    # accepted_hist[n]: decode steps that accepted n tree candidates.
    accepted_hist: list[int] = field(default_factory=list)
    # accepted_per_depth[d]: decode steps whose accepted path reached depth d+1 (head d right).
    accepted_per_depth: list[int] = field(default_factory=list)
    # Tree candidates the decode steps verified (the verify work speculation spent).
    num_verified_candidates: int = 0
    num_preemptions: int = 0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per decode step (1.0 without speculation)."""
        return self.num_decode_tokens / self.num_decode_steps if self.num_decode_steps else 0.0

    @property
    def mean_verified_candidates(self) -> float:
        """Tree candidates verified per decode step (0.0 without speculation)."""
        return self.num_verified_candidates / self.num_decode_steps if self.num_decode_steps else 0.0

    @property
    def per_head_acceptance(self) -> list[float]:
        """Fraction of decode steps in which head d's guess was accepted."""
        return [n / self.num_decode_steps for n in self.accepted_per_depth] if self.num_decode_steps else []

    def record_decode(self, num_accepted: int, per_depth: list[int], verified: int = 0) -> None:
        # Once per sequence and decode step: counted in place (at batch 64 the general
        # merge_counts was the scheduler update's dearest call).
        self.num_decode_steps += 1
        self.num_decode_tokens += num_accepted + 1
        self.num_verified_candidates += verified
        hist, depth = self.accepted_hist, self.accepted_per_depth
        if len(hist) <= num_accepted:
            hist.extend([0] * (num_accepted + 1 - len(hist)))
        hist[num_accepted] += 1
        if len(depth) < len(per_depth):
            depth.extend([0] * (len(per_depth) - len(depth)))
        for i, n in enumerate(per_depth):
            depth[i] += n

    def merge(self, other: "DecodeCounters") -> None:
        self.merge_counts(other.num_decode_steps, other.num_decode_tokens, other.accepted_hist,
                          other.accepted_per_depth)
        self.num_verified_candidates += other.num_verified_candidates

    def merge_counts(self, steps: int, tokens: int, hist: list[int], per_depth: list[int]) -> None:
        self.num_decode_steps += steps
        self.num_decode_tokens += tokens
        for mine, theirs in ((self.accepted_hist, hist), (self.accepted_per_depth, per_depth)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, n in enumerate(theirs):
                mine[i] += n


@dataclass
class RequestMetrics(DecodeCounters):
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    # Engine steps in which the request had work scheduled.
    num_steps: int = 0
    # Prompt tokens whose K/V came from the prefix cache when the request was first admitted
    # (OpenAI's usage.prompt_tokens_details.cached_tokens).
    num_cached_tokens: int = 0


@dataclass
class Request:
    request_id: str
    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    # Seed for this request's draws (the user's, or one drawn at arrival).
    seed: int
    # Every id that ends generation (the model's EOS set; the runner masks the same set below
    # min_tokens).
    eos_token_ids: frozenset[int]
    # The output's text so far (engine/output_processor.py); None for requests built without one.
    detokenizer: Optional[IncrementalDetokenizer] = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # Tokens whose K/V are in the paged cache (positions [0, num_computed)).
    num_computed: int = 0
    # Medusa candidates for the next decode step (kept with the sequence, sent each step).
    candidates: list[int] = field(default_factory=list)
    # Per candidate, its head's probability given its parent (speculative.adaptive only).
    candidate_confidence: list[float] = field(default_factory=list)
    finish_reason: Optional[str] = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    # Prefix caching: blocks are shared only between requests of the same salt (tenants), and
    # the identities of the request's full blocks so far (engine/core/block_manager.py).
    cache_salt: Optional[str] = None
    block_hashes: list[bytes] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_stop_reason(self, max_model_len: int) -> Optional[str]:
        """Stop conditions decided by token ids alone, checked after each appended token."""
        n_out = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if n_out >= self.params.min_tokens:
            if last in self.params.stop_token_ids:
                return "stop"
            if last in self.eos_token_ids and not self.params.ignore_eos:
                return "stop"
        if n_out >= self.params.max_tokens or self.num_tokens >= max_model_len:
            return "length"
        return None


@dataclass(eq=False)
class RequestOutput:
    """A request's state after a step. ``token_ids``, ``logprobs`` and ``text`` are read on
    demand: a step returns an output for every request it advanced, and copying (let alone
    detokenising) each one's whole output every step would cost O(length) per request per
    step. The sources are the request's own lists, which only grow (a stop string trims
    them once, in the step that finishes the request), so a later read still sees exactly
    the first ``num_tokens`` of them; text comes from the request's incremental detokenizer
    (engine/output_processor.py)."""
    request_id: str
    prompt_token_ids: list[int]
    finish_reason: Optional[str]
    metrics: RequestMetrics
    finished: bool = True
    source_token_ids: list[int] = field(default_factory=list, repr=False)
    source_logprobs: Optional[list[float]] = field(default=None, repr=False)
    source_top_logprobs: Optional[list[list[tuple[int, float]]]] = field(default=None, repr=False)
    num_tokens: int = 0
    # The text of token_ids (cut before a stop string).
    text_source: Optional[Callable[[], str]] = field(default=None, repr=False)

    @cached_property
    def token_ids(self) -> list[int]:
        return self.source_token_ids[: self.num_tokens]

    @cached_property
    def logprobs(self) -> Optional[list[float]]:
        return None if self.source_logprobs is None else self.source_logprobs[: self.num_tokens]

    @cached_property
    def top_logprobs(self) -> Optional[list[list[tuple[int, float]]]]:
        """Per token, the most likely [token id, logprob] pairs there (SamplingParams.top_logprobs)."""
        return None if self.source_top_logprobs is None else self.source_top_logprobs[: self.num_tokens]

    @cached_property
    def text(self) -> str:
        return self.text_source() if self.text_source is not None else ""
