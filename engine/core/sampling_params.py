"""SamplingParams (validated on construction) and how a request's step decides.

No tensors here: the scheduler and the wire structs use these. The sampler itself (keyed
draws, processed probabilities) is ``engine.sample.sampler``.

Randomness is keyed by (request seed, token position, draw): a uniform number is a hash of the
three (``keyed_uniform``, counter-based like Philox, integer arithmetic only), so it is the
same on the host and inside a captured CUDA graph, on any device. A request therefore gets
the same tokens alone or batched, before or after a preemption, with or without
speculation's bookkeeping, decided on the host or on the device — and no generator state
lives anywhere between steps. A token is drawn by inverting the cumulative distribution at
that uniform (``sample_rows``).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import msgspec


# Deeper schemas are refused (JSON encoders and grammar compilers recurse per level).
MAX_SCHEMA_DEPTH = 64


def _depth(value: Any) -> int:
    """How deep dicts and lists nest in ``value`` (iteratively: no recursion to exhaust)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_SCHEMA_DEPTH:
                todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


class StructuredOutputs(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A constraint on the output, exactly one kind (vLLM's ``StructuredOutputsParams``):

    json          a JSON schema (a dict, or its JSON text): the output is one JSON value valid
                  under it (OpenAI's ``response_format`` ``json_schema``)
    json_object   True: any JSON object (OpenAI's ``json_object`` mode)
    regex         the output matches this regular expression (Rust ``regex`` syntax)
    choice        the output is one of these strings
    grammar       a context-free grammar, GBNF (llama.cpp's EBNF) or Lark syntax

    JSON is written compactly, with ", " and ": " between items and no other whitespace, so a
    model cannot wander into endless blank lines; the grammar engine (engine/core/structured.py)
    compiles every kind. Greedy output under a constraint is the same with and without Medusa.
    """
    json: Any = None
    json_object: bool = False
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None

    def __post_init__(self) -> None:
        def bad(field: str, expected: str, got: object) -> ValueError:
            return ValueError(f"structured_outputs.{field}: expected {expected}, got {got!r:.200}")

        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json: not valid JSON ({e})") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise bad("json", "a JSON schema (an object, or its JSON text)", self.json)
        if self.json is not None and _depth(self.json) > MAX_SCHEMA_DEPTH:
            raise ValueError(f"structured_outputs.json: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if not isinstance(self.json_object, bool):
            raise bad("json_object", "True or False", self.json_object)
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise bad(name, "a non-empty string", v)
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or any(not isinstance(c, str) or not c for c in self.choice)):
            raise bad("choice", "a non-empty list of non-empty strings", self.choice)
        if self.choice is not None:
            self.choice = list(self.choice)
        kinds = self.kinds
        if len(kinds) != 1:
            raise ValueError("structured_outputs: set exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(kinds) or 'none'}")

    @property
    def kinds(self) -> list[str]:
        return [k for k in ("json", "json_object", "regex", "choice", "grammar")
                if getattr(self, k) not in (None, False)]

    @property
    def kind(self) -> str:
        return self.kinds[0]

    def key(self) -> str:
        """The constraint as one canonical string (what a compiled grammar is cached under)."""
        return json.dumps({self.kind: getattr(self, self.kind)}, sort_keys=True, separators=(",", ":"))


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
    # A constraint on the output (JSON schema, JSON object, regex, choice, grammar). Each step's
    # logits rows — every tree node's too — are masked by the grammar's state after that row's
    # path, so speculation stays exact under it; such a request decides on the host path.
    structured_outputs: Optional[StructuredOutputs] = None

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
        if self.structured_outputs is not None:
            if isinstance(self.structured_outputs, dict):
                try:
                    self.structured_outputs = msgspec.convert(self.structured_outputs, StructuredOutputs)
                except msgspec.ValidationError as e:  # (__post_init__'s errors name their field)
                    text = str(e)
                    raise ValueError(text if text.startswith("structured_outputs") else
                                     f"structured_outputs: {text}") from None
            if not isinstance(self.structured_outputs, StructuredOutputs):
                raise bad("structured_outputs", "None, a StructuredOutputs or a dict of its fields",
                          self.structured_outputs)
            # A finished grammar allows only EOS: ignoring EOS, or forbidding it below min_tokens,
            # would leave no token to produce.
            if self.ignore_eos:
                raise bad("ignore_eos", "False with structured_outputs (a finished grammar allows only EOS)",
                          self.ignore_eos)
            if self.min_tokens:
                raise bad("min_tokens", "0 with structured_outputs (a grammar may finish sooner)", self.min_tokens)
        # Whether the rule is registered is the engine's check (engine.sample.acceptance owns
        # the registry; this floor knows only names).
        if self.acceptance is not None and (not isinstance(self.acceptance, str) or not self.acceptance):
            raise bad("acceptance", "None or a registered rule's name", self.acceptance)

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


def decides_on_host(params: SamplingParams, num_output_tokens: int) -> bool:
    """Is a sampling step of this request decided on the host (the acceptance rules and the
    sampler) rather than by a tail on the device (engine/sample/tail.py)? Logprobs, penalties or
    logit bias, min_tokens still masking stop tokens, and structured outputs (grammar masks)."""
    return (bool(params.logprobs) or params.min_tokens > num_output_tokens or params.penalized
            or params.structured_outputs is not None)


DECISION_ROUTES = ("greedy", "sampled", "host")  # cheapest first


def decision_route(params: SamplingParams, num_output_tokens: int, rule_on_device: bool = True) -> str:
    """How a sampling step of this request decides: "greedy" (the device's greedy tail),
    "sampled" (the device's sampled tail: keyed draws, its acceptance rule's device version) or
    "host" (``rule_on_device`` False: a sampled request's rule has no device version)."""
    if decides_on_host(params, num_output_tokens) or not (params.greedy or rule_on_device):
        return "host"
    return "greedy" if params.greedy else "sampled"
