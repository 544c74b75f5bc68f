"""The end of a speculative step — decide, commit, propose — in one place.

After the forward, every sequence that samples needs: a decision (which tree path is accepted,
and the bonus token after it), the commit of the accepted nodes' K/V from the cache's scratch
region into the sequence's own slots (only accepted tokens ever live in request blocks), and
the heads' proposals for the next step, read at the last accepted token.

``SpecTail.greedy`` decides and commits on the device for a uniform step of greedy sequences
(B sequences × N nodes, no host round trip), and ``SpecTail.sampled`` for a uniform step in
which some sample (temperature, top-k, top-p, each sequence its own seed and acceptance
rule); ``SpecTail.propose_after`` then proposes from what they decided. The eager runner
calls them, and the CUDA graph runner captures the very same functions after the forward
graph — the decision and the proposal as two graphs, so that the host can read the decision
(and apply its tokens) while the device still proposes (engine/worker/model_runner.py). Steps they
cannot take (logprobs, penalties, min_tokens masking, mixed prefill) decide on the host with
the acceptance rules (engine/sample/acceptance.py) and then call the same ``commit`` and
``propose``.

Greedy decision, per sequence: along every root-to-leaf path, a candidate is accepted while it
equals the model's argmax at its parent; the first longest path wins; the bonus token is the
argmax at the last accepted node. Output equals plain greedy decoding token for token.

Sampled decision: each rule present in the step decides all sequences, each sequence keeping
its own rule's answer — exact match (processed probabilities and plain decoding's keyed draw
at every node, ``keyed_targets``), typical acceptance (probabilities at the nodes with
children only, then one draw at the last accepted node) or the rejection walk (one depth per
iteration, probabilities of the visited rows only). The draws are the host rules'
(engine/sample/sampler.py ``keyed_uniform``, ``sample_rows``: on CUDA one Triton launch each), so
both give the same tokens. Without top-k / top-p, typical acceptance reads the logits directly
(engine/kernels/typical_acceptance.py, two launches). A T=0.7 typical step cost 2.2x the greedy step
on the host path; here 1.05x at batch 1 and 1.0x at batch 16 (H100, 64-node tree:
profile_step, the median call).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from engine.attention.kv_cache import PagedKVCache
from engine.kernels import triton_applies
from engine.sample.acceptance import ACCEPTANCE_RULES, BatchedVerify, device_rules, greedy_tree_accept
from engine.sample.decided import bonus_tokens, last_rows, pack_rows
from engine.sample.sampler import processed_probs_rows
from engine.spec.proposer import MedusaProposer
from engine.spec.tree import MedusaTree


class SpecTail:
    def __init__(self, kv_cache: PagedKVCache, lm_head: Callable[[torch.Tensor], torch.Tensor],
                 proposer: Optional[MedusaProposer], epsilon: float = 0.09, alpha: float = 0.3) -> None:
        self.kv_cache, self.lm_head, self.proposer = kv_cache, lm_head, proposer
        self.epsilon, self.alpha = epsilon, alpha  # typical acceptance's
        # A verify step's greedy decision, and the rows and commit slots of any decision, as
        # single Triton launches (engine/kernels/decision.py) on CUDA, where Triton is; the
        # torch ops elsewhere (the same answers).
        self.fused = triton_applies(kv_cache.k_all)
        # Device copies of each tree's index tensors, made outside any graph capture (a
        # host→device copy cannot be captured) and kept alive for the graphs that read them.
        self._tree_tensors: dict[tuple[MedusaTree, str], torch.Tensor] = {}

    def commit(self, step_rows: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Copy the K/V of the step's rows ``step_rows`` (their scratch slots) to ``dst_slots``,
        every layer at once."""
        self.kv_cache.copy_slots(step_rows + self.kv_cache.scratch_slot0, dst_slots)

    def propose(self, hidden: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
        """hidden [S, H] at each sequence's last accepted token, roots [S] the token chosen there
        (the next step's pending token) → the full tree's candidates [S, C]."""
        return self.proposer.propose(hidden, roots)

    def device_tensor(self, tree: MedusaTree, name: str) -> torch.Tensor:
        """``tree.<name>`` (paths, depths, children_table, parent_nodes, parent_row) on the tail's
        device, made once."""
        key = (tree, name)
        if key not in self._tree_tensors:
            self._tree_tensors[key] = torch.as_tensor(getattr(tree, name), device=self.kv_cache.k_all.device)
        return self._tree_tensors[key]

    def propose_after(self, hidden: torch.Tensor, decided: torch.Tensor) -> torch.Tensor:
        """The full tree's next candidates [B, C] of the sequences ``greedy`` or ``sampled``
        decided (``decided``, their rows): the heads at each one's last accepted node, rooted
        at its bonus token."""
        return self.propose(hidden.index_select(0, last_rows(decided)), bonus_tokens(decided))

    def greedy(self, hidden: torch.Tensor, tree: Optional[MedusaTree], tokens: torch.Tensor,
               start: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """A uniform greedy step on the device. hidden [B*N, H] (sequence after sequence, N =
        the tree's nodes or 1), tokens [B, N] (the pending token, then the candidates), start
        [B, 1] (the pending token's position), tables [B, W] (block tables, padded with any
        block). Returns the decided rows [B, 1 + depth + 2] (engine/sample/decided.py)."""
        b, n = tokens.shape
        argmax = self.lm_head(hidden).argmax(-1).view(b, n)
        if tree is not None and self.fused:  # the same decision and commit, one launch
            return self._greedy_fused(tree, tokens, argmax, start[:, 0], tables)
        if tree is None:
            path = torch.zeros(b, 1, dtype=torch.long, device=hidden.device)
            n_acc = path[:, 0]
            bonus = argmax[:, 0]
        else:
            path, n_acc, bonus = self._greedy_path(tree, tokens, argmax)
        return self._finish(tree, tokens, start, tables, path, n_acc, bonus)

    def greedy_ragged(self, hidden: torch.Tensor, tree: MedusaTree, ids: torch.Tensor, nodes: torch.Tensor,
                      seqs: torch.Tensor, q_starts: torch.Tensor, start: torch.Tensor,
                      tables: torch.Tensor) -> torch.Tensor:
        """``greedy`` for a step of adaptive trees (engine/worker/cuda_graphs.py ``RaggedStep``):
        every sequence its pending token plus some of the full tree ``tree``'s nodes, its
        tokens flat — ids, nodes (in the full tree) and seqs [T] per token, q_starts [B + 1]
        (tokens past q_starts[B] are padding), start [B], tables [B, W]. Each token's row is
        scattered into the full tree's node space [B, N]; a node the sequence does not verify
        holds token -1, which no argmax equals, so the full tree's paths decide it as
        ``greedy`` does. A sequence with no tokens (padding) decides nothing. Same rows as
        ``greedy``, the hidden-state row of each being the step's flat row."""
        t, b, n = ids.shape[0], start.shape[0], tree.num_nodes
        dev = ids.device
        argmax = self.lm_head(hidden[:t]).argmax(-1)
        rows = torch.arange(t, device=dev)
        # Padding tokens all land on one spare entry past the B x N node space.
        flat = torch.where(rows < q_starts[-1], seqs * n + nodes, b * n)
        spread = lambda x, fill: torch.full((b * n + 1,), fill, dtype=torch.long, device=dev).scatter_(  # noqa: E731
            0, flat, x)[:-1].view(b, n)
        tokens, node_argmax, flat_row = spread(ids, -1), spread(argmax, 0), spread(rows, 0)
        if self.fused:  # the same decision and commit, one launch (each node's row from flat_row)
            return self._greedy_fused(tree, tokens, node_argmax, start, tables, flat_row)
        path, n_acc, bonus = self._greedy_path(tree, tokens, node_argmax)
        return self._finish(tree, tokens, start[:, None], tables, path, n_acc, bonus, flat_row)

    def _greedy_path(self, tree: MedusaTree, tokens: torch.Tensor, argmax: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The greedy decision in torch ops over [B, N] tokens and argmax: each sequence's
        accepted path [B, depth + 1], its accepted count [B] and bonus token [B] (the argmax
        at its last accepted node)."""
        paths = self.device_tensor(tree, "paths")
        best, n_acc = greedy_tree_accept(paths, tokens, argmax)
        path = paths[best]
        bonus = argmax.gather(1, path.clamp(min=0).gather(1, n_acc[:, None]))[:, 0]
        return path, n_acc, bonus

    def _greedy_fused(self, tree: MedusaTree, tokens: torch.Tensor, argmax: torch.Tensor, start: torch.Tensor,
                      tables: torch.Tensor, flat_row: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The greedy decision and its commit in one launch (engine/kernels/decision.py
        ``greedy_decide``): ``greedy``'s rows. start [B]; ``flat_row`` as ``_finish`` takes it."""
        from engine.kernels.decision import greedy_decide

        kv = self.kv_cache
        rows, src, dst = greedy_decide(tokens, argmax, self.device_tensor(tree, "paths"), start, tables,
                                       kv.block_size, kv.pad_slot, kv.scratch_slot0, flat_row)
        kv.copy_slots(src.flatten(), dst.flatten())
        return rows

    def propose_confident_after(self, hidden: torch.Tensor, decided: torch.Tensor) -> torch.Tensor:
        """``propose_after`` with each candidate's confidence (``propose_with_confidence``) for
        the adaptive policy: [B, 2C] int64, the candidates then their probabilities as float64
        bits (one tensor, one copy to the host: ``.view(torch.float64)`` reads them)."""
        cands, probs = self.proposer.propose_with_confidence(hidden.index_select(0, last_rows(decided)),
                                                             bonus_tokens(decided))
        return torch.cat([cands, probs.double().view(torch.int64)], dim=1)

    def sampled(self, hidden: torch.Tensor, tree: Optional[MedusaTree], tokens: torch.Tensor,
                start: torch.Tensor, tables: torch.Tensor, params: torch.Tensor, rules: frozenset,
                filters: bool, greedy_rows: bool = True) -> torch.Tensor:
        """``greedy``'s step for sequences that sample, each by its own acceptance rule, still
        on the device (no host sync): params [B, 5] float64 per sequence — temperature (0:
        greedy), top_p, top_k, seed key (engine/sample/sampler.py ``seed_key``), rule (its
        index in ``device_rules()``); ``rules`` the rules present, ``filters`` whether any
        sequence uses top-k or top-p, ``greedy_rows`` whether any is greedy. Every draw is
        keyed by (seed, position of the produced token, draw), as on the host, so the host
        rules give the same tokens for the same logits."""
        b, n = tokens.shape
        dev = hidden.device
        logits = self.lm_head(hidden).view(b, n, -1)
        temperature, top_p, top_k, keys, rule = params.unbind(1)
        keys, rule, top_k = keys.long(), rule.long(), top_k.long()

        def probs_of(rows: torch.Tensor) -> torch.Tensor:
            """Processed probabilities of each sequence's logits rows [B, R, V] (each sequence
            with its own parameters): only the rows a decision reads are ever computed."""
            r = rows.shape[1]
            out = processed_probs_rows(rows.flatten(0, 1), temperature.repeat_interleave(r),
                                       top_k.repeat_interleave(r), top_p.repeat_interleave(r), filters, greedy_rows)
            return out.view(b, r, -1)

        depths = self.device_tensor(tree, "depths") if tree is not None else torch.zeros(1, dtype=torch.long,
                                                                                         device=dev)
        # The token each node's row produces is at start + 1 + the node's depth.
        v = BatchedVerify(tree=tree, tokens=tokens, logits=logits, positions=start + 1 + depths[None], keys=keys,
                          temperature=temperature, filtered=filters, probs_of=probs_of,
                          tree_tensor=lambda name: self.device_tensor(tree, name), epsilon=self.epsilon,
                          alpha=self.alpha, triton=self.fused)
        if tree is None:  # plain decoding's keyed draw
            path = torch.zeros(b, 1, dtype=torch.long, device=dev)
            return self._finish(tree, tokens, start, tables, path, path[:, 0], v.draw_at(path[:, 0]))
        # Each present rule decides every sequence; each sequence keeps its own rule's answer.
        index = device_rules()
        path = torch.zeros(b, tree.depth + 1, dtype=torch.long, device=dev)
        n_acc = torch.zeros(b, dtype=torch.long, device=dev)
        bonus = torch.zeros(b, dtype=torch.long, device=dev)
        for name in sorted(rules, key=index.index):
            p, k, x = ACCEPTANCE_RULES[name].device(v)
            if len(rules) == 1:  # every sequence has this rule
                path, n_acc, bonus = p, k, x
                break
            mine = rule == index.index(name)
            path = torch.where(mine[:, None], p, path)
            n_acc, bonus = torch.where(mine, k, n_acc), torch.where(mine, x, bonus)
        return self._finish(tree, tokens, start, tables, path, n_acc, bonus)

    def _finish(self, tree: Optional[MedusaTree], tokens: torch.Tensor, start: torch.Tensor, tables: torch.Tensor,
                path: torch.Tensor, n_acc: torch.Tensor, bonus: torch.Tensor,
                flat_row: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Commit the accepted nodes (``path`` [B, depth + 1] root first, ``n_acc`` of them
        after the root); returns ``greedy``'s rows. ``flat_row`` [B, N]: each node's row of the
        step (None: node i of sequence b is row b * N + i, a uniform step's)."""
        b, n = tokens.shape
        dev = tokens.device
        if tree is not None and self.fused and flat_row is None:  # the same rows and commit, one launch
            from engine.kernels.decision import commit_rows

            kv = self.kv_cache
            rows, src, dst = commit_rows(tokens, path, n_acc, bonus, start[:, 0], tables, kv.block_size, kv.pad_slot,
                                         kv.scratch_slot0)
            kv.copy_slots(src.flatten(), dst.flatten())
            return rows
        seq = torch.arange(b, device=dev)
        if flat_row is None:
            flat_row = seq[:, None] * n + torch.arange(n, device=dev)[None, :]
        path = path.clamp(min=0)
        last = path.gather(1, n_acc[:, None])
        accepted = tokens[:, :0]
        if tree is not None:
            accepted = tokens.gather(1, path[:, 1:])
            # The accepted node at depth d goes to position start + d; rejected ones to the pad
            # slot, so the commit has the same shape every step.
            steps = torch.arange(1, tree.depth + 1, device=dev)
            page = self.kv_cache.block_size
            dst = self.kv_cache.slots(tables, (start + steps).clamp(max=tables.shape[1] * page - 1))
            dst = torch.where(steps[None, :] <= n_acc[:, None], dst, self.kv_cache.pad_slot)
            self.commit(flat_row.gather(1, path[:, 1:]).flatten(), dst.flatten())
        return pack_rows(n_acc, accepted, bonus, flat_row.gather(1, last)[:, 0])
