"""ModelRunner: SchedulerOutput → one forward pass → StepResult.

One forward covers the whole step: prefill chunks (causal over paged KV) and every decoding
sequence's pending token plus its Medusa tree (tree attention). Then, per sequence that samples:
the acceptance rule picks the path, the accepted tree nodes' K/V are copied from the step's
scratch into the sequence's paged slots (only accepted tokens ever live in the cache), and the
heads read the hidden state at the last accepted token to propose the next step's tree.
The runner makes no policy decisions: what to run comes from the scheduler.

With a CudaGraphRunner (CUDA), a step whose sequences all decode one token, or one token plus
the same tree, replays a captured forward instead; when every sequence is greedy the captured
tail also decides, commits and proposes on the device (engine/cuda_graphs.py). Other steps,
and the decisions of sampled requests, take the path above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.attention.base import AttentionBackend, SeqAttn, StepAttnInputs
from engine.config import SpeculativeConfig
from engine.cuda_graphs import CudaGraphRunner, graphable_nodes
from engine.models.llama import LlamaForCausalLM
from engine.sampling import SamplingParams, processed_probs, sample_token
from scheduler.outputs import ScheduledSeq, SchedulerOutput, SeqResult, StepResult
from spec_decode.acceptance import accept, accept_greedy_batch
from spec_decode.proposer import MedusaProposer
from spec_decode.tree import MedusaTree


@dataclass
class _SeqLayout:
    seq: ScheduledSeq
    offset: int  # first flat row of this sequence
    slots: list[int]  # slots of token_ids
    tree: bool


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, device: torch.device,
                 eos_token_ids: tuple[int, ...], proposer: Optional[MedusaProposer] = None,
                 spec: Optional[SpeculativeConfig] = None, graphs: Optional[CudaGraphRunner] = None) -> None:
        self.model, self.backend, self.device = model, backend, device
        # Decode and verify steps replay CUDA graphs when given; everything else runs eager.
        self.graphs = graphs
        self.eos_token_ids = eos_token_ids
        self.proposer, self.spec = proposer, spec
        self.tree: Optional[MedusaTree] = None
        # Trees a step may verify, by candidate count: the full tree, and with back-off the
        # smaller trees nested in it (the driver cuts each sequence's candidates down).
        self.trees: dict[int, MedusaTree] = {}
        if proposer is not None:
            self.set_tree(proposer.tree)
        self.block_size = backend.kv_cache.block_size

    def set_tree(self, tree: MedusaTree, nested: Optional[dict[int, MedusaTree]] = None) -> None:
        self.tree = self.proposer.tree = tree
        self.trees = {**(nested or {}), tree.num_nodes - 1: tree}

    def _slots(self, block_table: list[int], start: int, n: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, start + n)]

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        if not out.seqs:
            return StepResult(step_id=out.step_id, results=[])
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        attn: list[SeqAttn] = []
        layouts: list[_SeqLayout] = []
        sizes = {len(s.candidates) for s in out.seqs if s.candidates}
        if len(sizes) > 1 or not sizes <= self.trees.keys():
            raise ValueError(f"step {out.step_id}: candidate counts {sorted(sizes)} do not fit the engine's "
                             f"trees {sorted(self.trees)} (one tree size per step)")
        tree = self.trees[sizes.pop()] if sizes else self.tree
        for s in out.seqs:
            n = len(s.token_ids)
            has_tree = bool(s.candidates)
            if has_tree and n != 1:
                raise ValueError(f"seq {s.seq_id}: a tree follows exactly one pending token, got {n}")
            slots = self._slots(s.block_table, s.start_pos, n)
            layouts.append(_SeqLayout(s, len(ids), slots, has_tree))
            ids += s.token_ids
            positions += range(s.start_pos, s.start_pos + n)
            slot_mapping += slots
            if has_tree:
                ids += s.candidates
                positions += [s.start_pos + d for d in tree.depths[1:]]
                slot_mapping += [-1] * len(s.candidates)
            attn.append(SeqAttn(q_len=n + len(s.candidates), ctx_len=s.start_pos,
                                block_table=s.block_table, tree_mask=tree.mask if has_tree else None))

        step_tree = tree if any(l.tree for l in layouts) else None
        if self.graphs is not None and graphable_nodes(out.seqs, step_tree, self.graphs.width) is not None:
            g = self.graphs.run(out.seqs, step_tree, ids, positions, [l.slots[0] for l in layouts])
            if self._greedy_tail_applies(out):
                proposer = self.proposer if out.propose else None
                rows = self.graphs.run_greedy_tail(g, proposer)[:len(out.seqs)].tolist()
                return StepResult(step_id=out.step_id, results=self._tail_results(out, step_tree, rows))
            t = len(ids)
            hidden = g.hidden[:t]
            step_k, step_v = (g.step_k[:, :t], g.step_v[:, :t]) if g.step_k is not None else (None, None)
        else:
            step = StepAttnInputs(seqs=attn, slot_mapping=torch.tensor(slot_mapping, dtype=torch.long),
                                  keep_kv=step_tree is not None)
            meta = self.backend.prepare(step)
            hidden = self.model(torch.tensor(ids, device=self.device),
                                torch.tensor(positions, device=self.device), self.backend, meta)
            step_k = step_v = None
            if step.step_kv:
                step_k = torch.stack([k for k, _ in step.step_kv])
                step_v = torch.stack([v for _, v in step.step_kv])

        # Rows whose logits are needed: the last token of sampling sequences, every tree node.
        row_ranges: list[Optional[tuple[int, int]]] = []
        rows: list[int] = []
        for lay in layouts:
            if not lay.seq.sample:
                row_ranges.append(None)
                continue
            first = lay.offset + len(lay.seq.token_ids) - 1
            count = tree.num_nodes if lay.tree else 1
            row_ranges.append((len(rows), count))
            rows += range(first, first + count)
        results: list[SeqResult] = []
        if not rows:
            return StepResult(step_id=out.step_id,
                              results=[SeqResult(seq_id=l.seq.seq_id, token_ids=[]) for l in layouts])
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])

        commit_src: list[int] = []
        commit_dst: list[int] = []
        last_rows: list[int] = []
        for lay, rr in zip(layouts, row_ranges):
            if rr is not None:
                self._mask_before_min_tokens(logits[rr[0]:rr[0] + rr[1]], lay.seq, lay.seq.params or SamplingParams(),
                                             tree)
        # Greedy sequences are decided together, one device→host copy for the batch: trees by
        # the batched acceptance rule, plain decodes by one argmax.
        greedy = [(lay, rr) for lay, rr in zip(layouts, row_ranges)
                  if rr is not None and (lay.seq.params or SamplingParams()).greedy]
        greedy_tree = [(lay, rr) for lay, rr in greedy if lay.tree]
        greedy_plain = [(lay, rr) for lay, rr in greedy if not lay.tree]
        batched: dict[int, object] = {}
        if greedy_tree:
            rows_idx = torch.tensor([r0 for _, (r0, _) in greedy_tree], device=self.device)
            stacked = logits[rows_idx[:, None] + torch.arange(tree.num_nodes, device=self.device)]
            toks = torch.tensor([l.seq.token_ids[-1:] + l.seq.candidates for l, _ in greedy_tree], device=self.device)
            for (lay, _), acc in zip(greedy_tree, accept_greedy_batch(tree, toks, stacked)):
                batched[lay.seq.seq_id] = acc

        if greedy_plain:
            rows_idx = torch.tensor([r0 for _, (r0, _) in greedy_plain], device=self.device)
            for (lay, _), tok in zip(greedy_plain, logits.index_select(0, rows_idx).argmax(-1).tolist()):
                batched[lay.seq.seq_id] = tok

        for lay, rr in zip(layouts, row_ranges):
            s = lay.seq
            if rr is None:
                results.append(SeqResult(seq_id=s.seq_id, token_ids=[]))
                continue
            r0, count = rr
            seq_logits = logits[r0:r0 + count]
            params = s.params or SamplingParams()
            first_pos = s.start_pos + len(s.token_ids)  # position of the first token produced
            if lay.tree:
                node_list = s.token_ids[-1:] + s.candidates
                acc = batched.get(s.seq_id)
                if acc is None:
                    acc = accept(params.acceptance or self.spec.acceptance, tree,
                                 torch.tensor(node_list, device=self.device), seq_logits,
                                 params, s.seed, first_pos, self.spec.epsilon, self.spec.alpha)
                path, bonus = acc.path, acc.bonus
                new_tokens = [node_list[i] for i in path[1:]] + [bonus]
                root_pos = s.start_pos
                for node in path[1:]:
                    commit_src.append(lay.offset + node)
                    d = tree.depths[node]
                    commit_dst.append(self._slots(s.block_table, root_pos + d, 1)[0])
            elif s.seq_id in batched:
                path, new_tokens = [0], [batched[s.seq_id]]
            else:
                probs = processed_probs(seq_logits[0], params)
                path, new_tokens = [0], [sample_token(probs, params, s.seed, first_pos)]
            logprobs: list[float] = []
            if params.logprobs:
                lp = torch.log_softmax(seq_logits, dim=-1)
                logprobs = [float(lp[node, tok]) for node, tok in zip(path, new_tokens)]
            last_rows.append(lay.offset + len(s.token_ids) - 1 + path[-1])
            n_acc = len(path) - 1
            results.append(SeqResult(
                seq_id=s.seq_id, token_ids=new_tokens, logprobs=logprobs, num_accepted=n_acc,
                accepted_per_depth=[int(n_acc > d) for d in range(tree.depth)] if lay.tree else [],
            ))

        if commit_src:
            # The accepted nodes' K/V, all layers in one indexed copy.
            src = torch.tensor(commit_src, device=self.device)
            dst = torch.tensor(commit_dst, device=self.device)
            self.backend.kv_cache.commit(dst, step_k.index_select(1, src), step_v.index_select(1, src))

        if self.proposer is not None and last_rows and out.propose:
            cands = self.proposer.propose(hidden[torch.tensor(last_rows, device=self.device)]).tolist()
            it = iter(cands)
            for res in results:
                if res.token_ids:
                    res.next_candidates = next(it)
        return StepResult(step_id=out.step_id, results=results)

    @staticmethod
    def _greedy_tail_applies(out: SchedulerOutput) -> bool:
        """The captured greedy tail decides every sequence of the step: all greedy, no
        logprobs, no min_tokens still masking stop tokens (those need the per-sequence path)."""
        for s in out.seqs:
            p = s.params or SamplingParams()
            if not (s.sample and p.greedy) or p.logprobs or p.min_tokens > s.num_output_tokens:
                return False
        return True

    @staticmethod
    def _tail_results(out: SchedulerOutput, tree: Optional[MedusaTree], rows: list[list[int]]) -> list[SeqResult]:
        depth = tree.depth if tree is not None else 0
        results = []
        for s, r in zip(out.seqs, rows):
            n = r[0]
            results.append(SeqResult(
                seq_id=s.seq_id, token_ids=r[1:1 + n] + [r[1 + depth]], next_candidates=r[2 + depth:],
                num_accepted=n, accepted_per_depth=[int(n > d) for d in range(depth)]))
        return results

    def _mask_before_min_tokens(self, logits: torch.Tensor, s: ScheduledSeq, params: SamplingParams,
                                tree: Optional[MedusaTree]) -> None:
        """Below min_tokens, stop tokens cannot be produced: row i produces output index n + i
        (tree rows: n + depth)."""
        if params.min_tokens <= s.num_output_tokens:
            return
        stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(self.eos_token_ids))
        if not stop_ids:
            return
        depths = tree.depths if logits.shape[0] > 1 else [0]
        for row, d in enumerate(depths[: logits.shape[0]]):
            if s.num_output_tokens + d < params.min_tokens:
                logits[row, stop_ids] = float("-inf")
