"""Sampling parameters and the per-row sampler.

Randomness is keyed by (request seed, token position, draw): a uniform number is a hash of the
three (``keyed_uniform``, counter-based like Philox, integer arithmetic only), so it is the
same on the host and inside a captured CUDA graph, on any device. A request therefore gets
the same tokens alone or batched, before or after a preemption, with or without
speculation's bookkeeping, decided on the host or on the device — and no generator state
lives anywhere between steps. A token is drawn by inverting the cumulative distribution at
that uniform (``sample_rows``).
"""

from __future__ import annotations

from typing import Optional

import msgspec
import torch


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    max_tokens: int = 16
    min_tokens: int = 0
    # 0 means greedy.
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    # Return the log-probability of every chosen token (under the processed distribution),
    # and with top_logprobs = k the k most likely tokens at each position with theirs.
    logprobs: bool = False
    top_logprobs: int = 0
    # Per-request override of the engine's acceptance rule (greedy | typical | rejection).
    acceptance: Optional[str] = None
    # OpenAI's penalties on the tokens generated so far: logit -= presence * [count > 0] +
    # frequency * count. repetition_penalty (HF/vLLM, over prompt and output): a seen token's
    # logit is divided by it when positive, multiplied when negative. logit_bias: token id →
    # added to its logit. In a Medusa tree every node is penalised with its own history (the
    # output plus the candidates on its path), so speculation stays exact under them.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = {}

    def __post_init__(self) -> None:
        def bad(field: str, expected: str, got: object) -> ValueError:
            return ValueError(f"SamplingParams.{field}: expected {expected}, got {got!r:.200}")

        def is_int(v) -> bool:  # bool is an int to Python, never to this API
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.max_tokens) or self.max_tokens <= 0:
            raise bad("max_tokens", "an int > 0", self.max_tokens)
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"an int in [0, max_tokens={self.max_tokens}]", self.min_tokens)
        if not is_real(self.temperature) or not self.temperature >= 0 or self.temperature == float("inf"):
            raise bad("temperature", "a number >= 0 (0 = greedy)", self.temperature)
        if not is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "-1 or 0 (off) or a positive int", self.top_k)
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]", self.top_p)
        if self.seed is not None and (not is_int(self.seed) or not -2 ** 63 <= self.seed < 2 ** 64):
            raise bad("seed", "None or an int (64-bit)", self.seed)
        # One stop string may come bare, as OpenAI clients send it; None means none.
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", "a non-empty string or a list of them", self.stop)
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of non-negative ints", self.stop_token_ids)
        for flag in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "True or False", getattr(self, flag))
        if not is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= 20:
            raise bad("top_logprobs", "an int in [0, 20]", self.top_logprobs)
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs", "0 unless logprobs=True", self.top_logprobs)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_real(v) or not -2.0 <= v <= 2.0:
                raise bad(name, "a number in [-2, 2]", v)
        if not is_real(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            raise bad("repetition_penalty", "a number in (0, 10] (1 = off)", self.repetition_penalty)
        if not isinstance(self.logit_bias, dict) or any(
                not is_int(k) or k < 0 or not is_real(v) or not -100 <= v <= 100 for k, v in self.logit_bias.items()):
            raise bad("logit_bias", "a dict of token id (int >= 0) to a number in [-100, 100]", self.logit_bias)
        from spec_decode.acceptance import ACCEPTANCE_RULES  # (acceptance imports this module)

        if self.acceptance is not None and (not isinstance(self.acceptance, str) or self.acceptance not in ACCEPTANCE_RULES):
            raise bad("acceptance", f"None or one of {tuple(ACCEPTANCE_RULES)}", self.acceptance)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        """Top-k or top-p cuts the distribution (a sort over the vocabulary)."""
        return self.top_k > 0 or self.top_p < 1.0

    @property
    def penalized(self) -> bool:
        """Logits depend on the token history (penalties) or are biased."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


def decides_on_host(params: Optional["SamplingParams"], num_output_tokens: int) -> bool:
    """Is a sampling step of this request decided on the host (the acceptance rules and the
    sampler) rather than by a tail on the device (spec_decode/tail.py)? Logprobs, penalties or
    logit bias, and min_tokens still masking stop tokens."""
    p = params or SamplingParams()
    return bool(p.logprobs) or p.min_tokens > num_output_tokens or p.penalized


DECISION_PATHS = ("greedy", "sampled", "host")  # cheapest first


def decision_path(params: Optional["SamplingParams"], num_output_tokens: int) -> str:
    """How a sampling step of this request decides: "greedy" (the device's greedy tail),
    "sampled" (the device's sampled tail: keyed draws, typical or rejection) or "host"."""
    p = params or SamplingParams()
    if decides_on_host(p, num_output_tokens):
        return "host"
    return "greedy" if p.greedy else "sampled"


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
                    paths: list[list[int]]) -> None:
    """In place: row r of ``logits`` [R, V] predicts the token after ``output`` + ``paths[r]``
    (a tree node's candidates on its path; [] for the plain row). Plain decoding calls this
    with one row and the same history, so a tree node's processed logits equal what plain
    decoding computes at that position."""
    v = logits.shape[-1]
    dev = logits.device
    if params.logit_bias:
        ids = torch.tensor([k for k in params.logit_bias if k < v], dtype=torch.long, device=dev)
        bias = torch.tensor([b for k, b in params.logit_bias.items() if k < v], dtype=logits.dtype, device=dev)
        logits[:, ids] += bias
    base_out = torch.bincount(torch.tensor(output, dtype=torch.long, device=dev), minlength=v).to(logits.dtype) \
        if output else torch.zeros(v, dtype=logits.dtype, device=dev)
    seen_prompt = torch.zeros(v, dtype=torch.bool, device=dev)
    if prompt:
        seen_prompt[torch.tensor(prompt, dtype=torch.long, device=dev)] = True
    for r, path in enumerate(paths):
        counts = base_out.clone()
        if path:
            counts += torch.bincount(torch.tensor(path, dtype=torch.long, device=dev), minlength=v).to(logits.dtype)
        row = logits[r]
        if params.repetition_penalty != 1.0:
            seen = seen_prompt | (counts > 0)
            rp = params.repetition_penalty
            row[:] = torch.where(seen, torch.where(row > 0, row / rp, row * rp), row)
        if params.frequency_penalty or params.presence_penalty:
            row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


# The draw of a rejection walk's residual sample (after every child of a node is rejected);
# draws 0, 1, … are a node's children in rank order, draw 0 also a plain sample's.
RESIDUAL_DRAW = 0xFFFF


def seed_key(seed: int) -> int:
    """A request's seed (any 64-bit int) folded to the 32-bit key ``keyed_uniform`` hashes."""
    seed &= 0xFFFF_FFFF_FFFF_FFFF
    return _mix32((seed & 0xFFFF_FFFF) ^ _mix32(seed >> 32))  # on Python ints: ~1 us, no tensors


def _mix32(x):
    """A 32-bit integer hash (Chris Wellons' hash-prospector "hash32": 15, 0x2c1b3c6d, 12,
    0x297a2d39, 15), on an int64 tensor or a Python int in [0, 2**32). Both multipliers are
    below 2**30, so x * c stays below 2**62: exact in int64 on every device, no overflow, and
    two operations a multiply — the whole draw is ~35 elementwise kernels in a captured tail."""
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & 0xFFFF_FFFF
    x = x ^ (x >> 12)
    x = (x * 0x297A2D39) & 0xFFFF_FFFF
    return x ^ (x >> 15)


def keyed_uniform(key: torch.Tensor, position, draw) -> torch.Tensor:
    """Uniform numbers in (0, 1), float64, one per element of the broadcast of ``key`` (a
    ``seed_key``), ``position`` (the produced token's) and ``draw`` (int64 tensors or ints)."""
    # (Python ints stay Python ints: a host→device copy cannot be captured in a CUDA graph.)
    tensors = [x for x in (key, position, draw) if isinstance(x, torch.Tensor)]
    if tensors and tensors[0].is_cuda and len(torch.broadcast_shapes(*(x.shape for x in tensors))) <= 2:
        from engine import sampling_kernel  # the same hash in one launch, not ~35 (bit for bit)

        return sampling_kernel.keyed_uniform(key, position, draw)
    h = _mix32(key & 0xFFFF_FFFF)
    h = _mix32(h ^ (position & 0xFFFF_FFFF))
    h = _mix32(h ^ ((draw * 0x9E37 + 0x79B9) & 0xFFFF_FFFF))
    return (h.double() + 0.5) / 2.0 ** 32


def sample_rows(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [R, V] (rows need not sum to 1), u [R] uniforms in (0, 1) → tokens [R]: the first
    token whose cumulative mass reaches u times the row's total (never a zero-mass token). On
    CUDA one Triton program per row, summing in float64 (engine/sampling_kernel.py): every CUDA
    draw, the device tails' and the host rules', is that program's."""
    if probs.is_cuda:
        from engine import sampling_kernel

        return sampling_kernel.sample_rows(probs, u)
    cdf = probs.float().cumsum(-1)
    x = (u.double() * cdf[:, -1].double()).float().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.searchsorted(cdf, x[:, None]).clamp(max=probs.shape[-1] - 1)[:, 0]


def processed_probs_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                         top_p: torch.Tensor, filters: bool = True, greedy_rows: bool = True) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, each row [R, V] with its own
    temperature [R] (0: greedy, the one-hot of the argmax), top_k [R] (0: off) and top_p [R]
    (1: off). ``filters`` False skips top-k/top-p (every row has them off): no sort;
    ``greedy_rows`` False: no row is greedy, no one-hot (each skips passes over [R, V], which
    at 16 sequences of a 64-node tree is 50M numbers a pass; a row's values never change)."""
    greedy = temperature <= 0
    # (bf16 logits / float32 temperatures: promoted to float32 in the one pass)
    x = logits / torch.where(greedy, 1.0, temperature.float())[:, None]
    if x.dtype != torch.float32:
        x = x.float()
    if filters:
        v = x.shape[-1]
        ordered = torch.sort(x, dim=-1, descending=True).values
        k = top_k.long().clamp(min=0)
        kth = ordered.gather(1, (k - 1).clamp(min=0, max=v - 1)[:, None])
        x = x.masked_fill(((k > 0) & (k < v))[:, None] & (x < kth), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if filters:
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        drop = ((sorted_p.cumsum(-1) - sorted_p) >= top_p.float()[:, None]) & (top_p < 1.0)[:, None]
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p.masked_fill(drop, 0.0))
        # Only rows that dropped mass are renormalised: a row's result never depends on
        # whether another row of the batch turned the filters on.
        probs = torch.where((top_p < 1.0)[:, None], probs / probs.sum(-1, keepdim=True), probs)
    if not greedy_rows:
        return probs
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.where(greedy[:, None], one_hot, probs)


def params_rows(params: list["SamplingParams"], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(temperature, top_k (0: off), top_p) [len(params)], one row per params, for
    ``processed_probs_rows``."""
    return (torch.tensor([float(p.temperature) for p in params], device=device),
            torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.long, device=device),
            torch.tensor([float(p.top_p) for p in params], device=device))


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (rows of ``logits`` share ``params``).

    For greedy params this is the one-hot of the argmax, so acceptance rules can treat
    greedy as the zero-temperature limit. The same function as the device tails' (one row's
    result does not depend on the others)."""
    rows = logits.reshape(-1, logits.shape[-1])
    out = processed_probs_rows(rows, *params_rows([params] * rows.shape[0], logits.device), filters=params.filtered,
                               greedy_rows=params.greedy)
    return out.view(logits.shape)


def sample_token(probs: torch.Tensor, params: SamplingParams, seed: int, position: int) -> int:
    """Draw one token from a processed distribution [V] (argmax when greedy), keyed by the
    request's seed and the token's position (draw 0, plain decoding's)."""
    if params.greedy:
        return int(probs.argmax())
    key = torch.tensor([seed_key(seed)], device=probs.device)
    return int(sample_rows(probs[None], keyed_uniform(key, position, 0))[0])
