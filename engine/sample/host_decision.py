"""The host path of a step's decision: every sequence a device tail cannot decide — prompts
and mixed steps, logprobs, penalties and logit bias, min_tokens masking stop tokens, a rule
without a device version — decided from its logits rows by the acceptance rules.

Structured outputs mask each row by the grammar's state after that row's path
(``ScheduledSeq.grammar_bitmask``, made on the driver: engine/core/structured.py), after
penalties and before every rule, so greedy and sampled rules read what plain decoding under
the same grammar reads.

Row i of a sequence's logits predicts the token after its tree node i (one row without a
tree). Penalties treat every node with its own history (the output plus the candidates on its
path), and stop tokens are masked on the rows that produce an output index below min_tokens,
so a tree node's processed logits equal what plain decoding computes at that position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from engine.core.outputs import ScheduledSeq
from engine.core.sampling_params import SamplingParams
from engine.sample.acceptance import Accepted, accept, accept_greedy_batch, keyed_targets
from engine.sample.sampler import apply_penalties, apply_token_bitmask, params_rows, processed_probs_rows, seed_key
from engine.spec.tree import MedusaTree

RowRange = tuple[int, int]  # (first logits row, rows): a sequence's rows among the step's


@dataclass
class HostDecision:
    path: list[int]  # accepted tree nodes, root first ([0] without a tree)
    tokens: list[int]  # the accepted candidates, then the bonus token
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


def logits_rows(seqs: list[ScheduledSeq], offsets: list[int]) -> tuple[list[Optional[RowRange]], list[int]]:
    """Which rows of the step's hidden states need logits — the last token of every sampling
    sequence and its tree's nodes — as each sequence's range among them (None: it does not
    sample) and the flat row list."""
    ranges: list[Optional[RowRange]] = []
    rows: list[int] = []
    for s, offset in zip(seqs, offsets):
        if not s.sample:
            ranges.append(None)
            continue
        ranges.append((len(rows), s.tree_size + 1))
        first = offset + len(s.token_ids) - 1
        rows += range(first, first + s.tree_size + 1)
    return ranges, rows


class HostDecider:
    def __init__(self, default_rule: str, epsilon: float, alpha: float, eos_token_ids: tuple[int, ...]) -> None:
        self.default_rule, self.epsilon, self.alpha = default_rule, epsilon, alpha
        self.eos_token_ids = eos_token_ids  # masked below min_tokens (unless ignore_eos)

    def decide(self, seqs: list[ScheduledSeq], ranges: list[Optional[RowRange]], logits: torch.Tensor,
               trees: Sequence[Optional[MedusaTree]]) -> list[Optional[HostDecision]]:
        """Each sampling sequence's decision from its ``logits`` rows (modified in place by
        penalties and masks); None for a sequence that does not sample. ``trees``: each
        sequence's tree (None: it verifies none)."""
        for s, rr, tree in zip(seqs, ranges, trees):
            if rr is not None:
                rows = logits[rr[0]:rr[0] + rr[1]]
                if s.params.penalized:
                    self._penalize(rows, s, tree)
                self._mask_before_min_tokens(rows, s, tree)
        # Structured outputs: each row masked by its path's grammar state, every constrained
        # sequence's rows in one copy and one masked fill.
        constrained = [(s, rr) for s, rr in zip(seqs, ranges) if rr is not None and s.grammar_bitmask]
        if constrained:
            idx = torch.tensor([r for _, (r0, n) in constrained for r in range(r0, r0 + n)], device=logits.device)
            rows = logits.index_select(0, idx)
            apply_token_bitmask(rows, b"".join(s.grammar_bitmask for s, _ in constrained))
            logits.index_copy_(0, idx, rows)
        accepted = self._accept(seqs, ranges, logits, trees)
        out: list[Optional[HostDecision]] = []
        for s, rr in zip(seqs, ranges):
            if rr is None:
                out.append(None)
                continue
            path, tokens = accepted[s.seq_id]
            d = HostDecision(path, tokens)
            if s.params.logprobs:
                lp = torch.log_softmax(logits[rr[0]:rr[0] + rr[1]], dim=-1)
                d.logprobs = [float(lp[node, tok]) for node, tok in zip(path, tokens)]
                if s.params.top_logprobs:
                    vals, ids = torch.topk(lp[path], s.params.top_logprobs, dim=-1)
                    d.top_logprobs = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
            out.append(d)
        return out

    def _accept(self, seqs: list[ScheduledSeq], ranges: list[Optional[RowRange]], logits: torch.Tensor,
                trees: Sequence[Optional[MedusaTree]]) -> dict[int, tuple[list[int], list[int]]]:
        """seq_id → (accepted path, new tokens) for every sequence that samples. Greedy ones are
        decided together, one device→host copy per tree: trees by the batched greedy rule,
        plain decodes by one argmax; sampled plain rows by one batched keyed draw; sampled trees
        by their acceptance rule."""
        dev = logits.device
        decided: dict[int, tuple[list[int], list[int]]] = {}
        tree_of = {s.seq_id: t for s, t in zip(seqs, trees)}
        greedy = [(s, rr) for s, rr in zip(seqs, ranges) if rr is not None and s.params.greedy]
        greedy_plain = [(s, rr) for s, rr in greedy if not s.tree_size]
        by_tree: dict[int, list[tuple[ScheduledSeq, RowRange]]] = {}  # (adaptive trees: one group each)
        for s, rr in greedy:
            if s.tree_size:
                by_tree.setdefault(id(tree_of[s.seq_id]), []).append((s, rr))
        accepted: dict[int, Accepted] = {}
        for group in by_tree.values():
            tree = tree_of[group[0][0].seq_id]
            idx = torch.tensor([r0 for _, (r0, _) in group], device=dev)
            stacked = logits[idx[:, None] + torch.arange(tree.num_nodes, device=dev)]
            toks = torch.tensor([s.token_ids[-1:] + s.candidates for s, _ in group], device=dev)
            accepted.update({s.seq_id: a for (s, _), a in zip(group, accept_greedy_batch(tree, toks, stacked))})
        if greedy_plain:
            idx = torch.tensor([r0 for _, (r0, _) in greedy_plain], device=dev)
            for (s, _), tok in zip(greedy_plain, logits.index_select(0, idx).argmax(-1).tolist()):
                decided[s.seq_id] = [0], [tok]
        # Sampled plain rows (a prompt's first token, a decode without a tree) in one batched
        # draw — per row what sample_token draws (the same keys, a row's probabilities do not
        # depend on the others) — instead of a few dozen small kernels and a sync per sequence.
        sampled_plain = [(s, rr) for s, rr in zip(seqs, ranges) if rr is not None and not s.tree_size
                         and s.seq_id not in decided]
        if sampled_plain:
            ps = [s.params for s, _ in sampled_plain]
            probs = processed_probs_rows(
                logits.index_select(0, torch.tensor([r0 for _, (r0, _) in sampled_plain], device=dev)),
                *params_rows(ps, dev), filters=any(p.filtered for p in ps), greedy_rows=False)
            keys = torch.tensor([seed_key(s.seed) for s, _ in sampled_plain], device=dev)
            positions = torch.tensor([[s.start_pos + len(s.token_ids)] for s, _ in sampled_plain], device=dev)
            for (s, _), tok in zip(sampled_plain, keyed_targets(probs[:, None], keys, positions)[:, 0].tolist()):
                decided[s.seq_id] = [0], [tok]
        for s, rr in zip(seqs, ranges):
            if rr is None or s.seq_id in decided:
                continue
            node_list = s.token_ids[-1:] + s.candidates  # (every sequence left verifies a tree)
            acc = accepted.get(s.seq_id)
            if acc is None:
                first_pos = s.start_pos + len(s.token_ids)  # position of the first token produced
                acc = accept(s.params.acceptance or self.default_rule, tree_of[s.seq_id],
                             torch.tensor(node_list, device=dev),
                             logits[rr[0]:rr[0] + rr[1]], s.params, s.seed, first_pos, self.epsilon, self.alpha)
            decided[s.seq_id] = acc.path, [node_list[i] for i in acc.path[1:]] + [acc.bonus]
        return decided

    @staticmethod
    def _penalize(logits: torch.Tensor, s: ScheduledSeq, tree: Optional[MedusaTree]) -> None:
        """Penalties and logit bias, each row with its own history: row i (tree node i)
        follows the output and the candidates on node i's path."""
        n_out = s.num_output_tokens
        prompt, output = s.history[:len(s.history) - n_out], s.history[len(s.history) - n_out:]
        paths = [[]]
        if s.tree_size:  # node i's candidates from depth 1 down to itself (the root is already output)
            tokens = [0] + list(s.candidates)
            paths += [[tokens[j] for j in tree.node_paths[i][1:]] for i in range(1, logits.shape[0])]
        apply_penalties(logits, s.params, prompt, output, paths)

    def _mask_before_min_tokens(self, logits: torch.Tensor, s: ScheduledSeq, tree: Optional[MedusaTree]) -> None:
        """Below min_tokens, stop tokens (the whole EOS set and stop_token_ids) cannot be
        produced: row i produces output index n + i (tree rows: n + depth)."""
        params: SamplingParams = s.params
        if params.min_tokens <= s.num_output_tokens:
            return
        stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(self.eos_token_ids))
        if not stop_ids:
            return
        depths = tree.depths if logits.shape[0] > 1 else [0]
        for row, d in enumerate(depths[: logits.shape[0]]):
            if s.num_output_tokens + d < params.min_tokens:
                logits[row, stop_ids] = float("-inf")
