"""Structured outputs on the driver: grammars compiled once per constraint, one matcher per
constrained request, and each step's token masks — one per logits row the step's decision reads.

The grammar engine is llguidance (``GuidanceBackend``), chosen over xgrammar because:
- it has no dependencies (xgrammar's wheel pulls Triton and a TVM runtime into a CPU install);
- it compiles nothing ahead: a JSON schema, regex, choice list or GBNF/Lark grammar becomes a
  matcher in about a millisecond, and its masks are computed lazily (tens of µs for JSON), so
  per-request schemas need no warm cache;
- one API covers every kind the server takes, with rollback for speculation.
It sits behind ``GrammarBackend`` / ``GrammarMatcher``; another engine is one more backend.

Masks are bitmasks: int32 words, little-endian, token t allowed when bit t % 32 of word t // 32
is set (llguidance's and xgrammar's layout); a step's rows are concatenated into
``ScheduledSeq.grammar_bitmask`` and applied on the worker (``engine/sample/sampler.py``
``apply_token_bitmask``) before any acceptance rule reads the rows.

Row i of a tree step predicts the token after tree node i, so its mask is the grammar's state
after the committed output plus the candidates on node i's path: a node whose own token the
grammar refuses can never be accepted (its parent's row forbids it), and every row a decision
reads is masked exactly as plain decoding masks that position. With ``prune`` the tree is
also fitted to the grammar before it is verified: where a node's parent state allows only a
few tokens (JSON's forced quotes, colons and braces), siblings whose token the grammar refuses
are given the allowed tokens instead, so the verify step spends its nodes on candidates that
can be accepted.

The matcher advances only over committed tokens (``advance``, from the request's output); a
step's masks come from consuming a path's candidates and rolling them back. Preemption keeps
a request's output, so its matcher stays valid; a finished request's matcher is dropped.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Protocol, Sequence

from engine.core.outputs import ScheduledSeq
from engine.core.sampling_params import StructuredOutputs

logger = logging.getLogger(__name__)

# JSON as most chat models write it when asked for compact JSON: ", " and ": ", no other
# whitespace (a flexible-whitespace grammar lets a small model emit blank lines forever).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# A parent state allowing at most this many tokens donates them to siblings the grammar refuses.
PRUNE_MAX_ALLOWED = 8


class GrammarMatcher(Protocol):
    def consume(self, tokens: Sequence[int]) -> bool: ...  # False: refused (the matcher is then broken)
    def rollback(self, n: int) -> None: ...
    def bitmask(self) -> bytes: ...  # the next token's mask (module doc's layout)
    def error(self) -> str: ...


class GrammarBackend(Protocol):
    name: str
    def compile(self, spec: StructuredOutputs) -> Any: ...  # ValueError naming the field
    def matcher(self, compiled: Any) -> GrammarMatcher: ...


class _GuidanceMatcher:
    """An LLMatcher. Once its grammar is complete it stops and allows only EOS, but refuses to
    consume anything more (EOS included) and would never recover; here EOS after the stop is
    taken without touching it, and counted so that a rollback undoes it first."""

    def __init__(self, m, eos: frozenset[int]) -> None:
        self._m, self._eos = m, eos
        self._past_stop = 0  # EOS tokens taken after the stop

    def consume(self, tokens: Sequence[int]) -> bool:
        for t in tokens:
            if self._m.is_stopped():
                if t not in self._eos:
                    return False
                self._past_stop += 1
            elif not self._m.consume_token(t):
                return False
        return True

    def rollback(self, n: int) -> None:
        undone = min(n, self._past_stop)
        self._past_stop -= undone
        if n > undone:
            self._m.rollback(n - undone)

    def bitmask(self) -> bytes:
        return self._m.compute_bitmask()

    def error(self) -> str:
        return self._m.get_error() or ("a token other than EOS after the grammar completed" if self._m.is_stopped()
                                       else "")


class GuidanceBackend:
    """llguidance: ``tokenizer`` is its LLTokenizer over the model's vocabulary (built by the
    engine from the HF tokenizer, with the engine's EOS set)."""
    name = "guidance"

    def __init__(self, tokenizer: Any, cache_size: int = 256) -> None:
        import llguidance

        self._llg, self._tok = llguidance, tokenizer
        self._eos = frozenset(tokenizer.eos_tokens)
        self._cache: dict[str, str] = {}  # constraint key → validated grammar (insertion order: LRU)
        self._cache_size = cache_size

    def compile(self, spec: StructuredOutputs) -> str:
        key = spec.key()
        grammar = self._cache.pop(key, None)
        if grammar is None:
            grammar = self._grammar(spec)
            err = self._llg.LLMatcher.validate_grammar(grammar, self._tok)
            if err and not err.startswith("WARNING"):
                raise ValueError(f"structured_outputs.{spec.kind}: {err.strip()[:500]}")
        self._cache[key] = grammar
        while len(self._cache) > self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        return grammar

    def _grammar(self, spec: StructuredOutputs) -> str:
        llg, kind = self._llg, spec.kind
        try:
            if kind in ("json", "json_object"):
                schema = spec.json if kind == "json" else {"type": "object"}
                if schema is True:
                    schema = {}
                if schema is False:
                    raise ValueError("the schema false allows nothing")
                return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
            if kind == "regex":
                return llg.LLMatcher.grammar_from_regex(spec.regex)
            if kind == "choice":
                return llg.grammar_from("choice", json.dumps(spec.choice))
            return llg.grammar_from("grammar", spec.grammar)
        except ValueError as e:
            raise ValueError(f"structured_outputs.{kind}: {e}") from None

    def matcher(self, compiled: str) -> GrammarMatcher:
        m = self._llg.LLMatcher(self._tok, compiled, log_level=0)
        if m.is_error():
            raise ValueError(f"structured_outputs: {m.get_error()[:500]}")
        return _GuidanceMatcher(m, self._eos)


def _allowed(mask: bytes, token: int) -> bool:
    byte = token >> 3
    return byte < len(mask) and (mask[byte] >> (token & 7)) & 1 == 1


def _allowed_tokens(mask: bytes, limit: int) -> Optional[list[int]]:
    """The allowed token ids when there are at most ``limit`` of them, else None."""
    bits = int.from_bytes(mask, "little")
    if bits.bit_count() > limit:
        return None
    out = []
    while bits:
        low = bits & -bits
        out.append(low.bit_length() - 1)
        bits ^= low
    return out


class StructuredOutputManager:
    """The driver's grammar state: a matcher per constrained request, and the masks and pruned
    candidates of each step (``prepare``), before the step goes to the workers."""

    def __init__(self, backend: GrammarBackend, prune: bool = True, threads: int = 1) -> None:
        self.backend, self.prune, self.threads = backend, prune, threads
        self._all = b""  # a row no decision can reach: left unmasked (the backend's mask length)
        self._mask_len = 0
        self._pool: Optional[ThreadPoolExecutor] = None
        self._matchers: dict[int, GrammarMatcher] = {}
        self._consumed: dict[int, int] = {}
        # Counters for the benchmark: tree nodes checked, refused by the grammar, given a new token.
        self.nodes = self.refused = self.replaced = 0

    def check(self, spec: StructuredOutputs) -> None:
        """Compile (or find compiled) ``spec``; ValueError naming the field if it does not compile."""
        self.backend.compile(spec)

    def add(self, seq_id: int, spec: StructuredOutputs) -> None:
        self._matchers[seq_id] = self.backend.matcher(self.backend.compile(spec))
        self._consumed[seq_id] = 0

    def remove(self, seq_id: int) -> None:
        self._matchers.pop(seq_id, None)
        self._consumed.pop(seq_id, None)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    def advance(self, seq_id: int, output_token_ids: Sequence[int]) -> Optional[str]:
        """Consume the request's newly committed output tokens; the grammar's error if it
        refused one (never for tokens decided under its masks), else None."""
        m = self._matchers.get(seq_id)
        done = self._consumed.get(seq_id, 0)
        if m is None or done >= len(output_token_ids):
            return None
        self._consumed[seq_id] = len(output_token_ids)
        if not m.consume(output_token_ids[done:]):
            return m.error() or "the grammar refused a token"
        return None

    def prepare(self, seqs: Sequence[ScheduledSeq],
                children_of: Callable[[ScheduledSeq], Sequence[Sequence[int]]]) -> None:
        """For every constrained sequence that samples: its rows' masks into
        ``grammar_bitmask``, and (``prune``) its candidates fitted to the grammar.
        ``children_of``: a sequence's tree as each node's children (``MedusaTree.children``;
        node 0 the root).
        With ``threads`` > 1 the sequences run on a thread pool (the grammar engine computes a
        mask without the GIL; the walk itself holds it)."""
        work = [(self._matchers[s.seq_id], s) for s in seqs if s.sample and s.seq_id in self._matchers]
        if len(work) > 1 and self.threads > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="grammar-masks")
            counts = list(self._pool.map(lambda w: self._prepare_one(*w, children_of), work))
        else:
            counts = [self._prepare_one(m, s, children_of) for m, s in work]
        for nodes, refused, replaced in counts:
            self.nodes += nodes
            self.refused += refused
            self.replaced += replaced

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def _prepare_one(self, m: GrammarMatcher, s: ScheduledSeq,
                     children_of: Callable[[ScheduledSeq], Sequence[Sequence[int]]]) -> tuple[int, int, int]:
        """One sequence's masks and fitted candidates; (nodes checked, refused, replaced)."""
        if not s.tree_size:
            mask = m.bitmask()
            s.grammar_bitmask = mask if mask.count(0) != len(mask) else self._ones(len(mask))
            return 0, 0, 0
        tokens = [s.token_ids[-1]] + list(s.candidates)
        masks: list[Optional[bytes]] = [None] * len(tokens)
        counts = [0, 0, 0]
        self._visit(m, 0, tokens, children_of(s), masks, counts)
        s.candidates = tokens[1:]
        ones = self._ones(self._mask_len) if None in masks else b""
        s.grammar_bitmask = b"".join(x if x is not None else ones for x in masks)
        return counts[0], counts[1], counts[2]

    def _ones(self, n: int) -> bytes:
        if len(self._all) != n:
            self._all = b"\xff" * n
        return self._all

    def _visit(self, m: GrammarMatcher, node: int, tokens: list[int], children: Sequence[Sequence[int]],
               masks: list[Optional[bytes]], counts: list[int]) -> None:
        """Depth first from ``node`` (the matcher stands after its path): its mask, its
        children's tokens checked (and, pruning, replaced) against it, then each allowed child
        with its token consumed and rolled back."""
        mask = m.bitmask()
        self._mask_len = len(mask)
        if mask.count(0) == len(mask):  # a finished grammar: nothing below is reachable
            return
        masks[node] = mask
        kids = children[node]
        counts[0] += len(kids)
        refused = [c for c in kids if not _allowed(mask, tokens[c])]
        counts[1] += len(refused)
        if refused and self.prune:
            allowed = _allowed_tokens(mask, PRUNE_MAX_ALLOWED)
            if allowed is not None:
                held = {tokens[c] for c in kids if c not in refused}
                spare = iter(t for t in allowed if t not in held)
                for c in refused:
                    t = next(spare, None)
                    if t is None:
                        break
                    tokens[c] = t
                    counts[2] += 1
        for c in kids:
            if _allowed(mask, tokens[c]) and m.consume([tokens[c]]):
                self._visit(m, c, tokens, children, masks, counts)
                m.rollback(1)
