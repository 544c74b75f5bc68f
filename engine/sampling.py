"""Sampling parameters and the per-row sampler.

Randomness is keyed by (request seed, token position): the draw for the token at position p
of a request uses a generator seeded from both. A request therefore gets the same tokens
alone or batched, before or after a preemption, with or without speculation's bookkeeping —
and no generator state needs to live anywhere between steps.
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
    def penalized(self) -> bool:
        """Logits depend on the token history (penalties) or are biased."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


def decides_on_host(params: Optional["SamplingParams"], num_output_tokens: int) -> bool:
    """Is a sampling step of this request decided on the host (the acceptance rules and the
    sampler) rather than by the device's greedy tail? Sampled requests, logprobs, penalties or
    logit bias, and min_tokens still masking stop tokens."""
    p = params or SamplingParams()
    return not p.greedy or bool(p.logprobs) or p.min_tokens > num_output_tokens or p.penalized


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


def position_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    """The generator for the token at ``position`` of a request seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 0x9E3779B1 + position * 0x85EBCA77) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (rows of ``logits`` share ``params``).

    For greedy params this is the one-hot of the argmax, so acceptance rules can treat
    greedy as the zero-temperature limit.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_token(probs: torch.Tensor, params: SamplingParams, seed: int, position: int) -> int:
    """Draw one token from a processed distribution (argmax when greedy)."""
    if params.greedy:
        return int(probs.argmax())
    gen = position_generator(seed, position, probs.device)
    return int(torch.multinomial(probs, 1, generator=gen))
