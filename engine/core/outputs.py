"""What the scheduler tells the workers to run in one step, and what comes back.

Both are msgspec Structs: they are the wire format between the driver and (Ray) workers,
so the scheduler never touches tensors and every rank decodes the same bytes.

Naming: a step's *input* tokens are ``ScheduledSeq.token_ids`` (whose K/V the step computes);
what it *produces* is ``SeqResult.sampled_token_ids``.
"""

from __future__ import annotations

import msgspec

from engine.core.sampling_params import SamplingParams


class ScheduledSeq(msgspec.Struct, kw_only=True, array_like=True):
    seq_id: int
    # Tokens whose K/V this step computes: a prefill chunk, or the one pending token.
    token_ids: list[int]
    # Position of token_ids[0]; the paged cache already holds positions [0, start_pos).
    start_pos: int
    block_table: list[int]
    # True when this chunk reaches the end of the sequence: sample the next token(s).
    sample: bool
    # The Medusa tree this sequence verifies, named by its number of candidates: a key of the
    # engine's tree set (the full tree and the smaller trees nested in it); 0: none.
    tree_size: int = 0
    # That tree's candidate tokens (one per non-root node) following token_ids[-1].
    candidates: list[int] = []
    params: SamplingParams
    seed: int = 0
    # Number of tokens the request has generated before this step (for stop/min_tokens math).
    num_output_tokens: int = 0
    # Prompt and output tokens so far, only for a sampling step of a request with penalties
    # (params.penalized): the output is the last num_output_tokens of it.
    history: list[int] = []
    # Structured outputs: the grammar's token mask for each logits row the step's decision
    # reads (tree_size + 1 rows, or one), concatenated (engine/core/structured.py's layout).
    grammar_bitmask: bytes = b""
    # An adaptive tree (speculative.adaptive): the full tree's candidates this sequence verifies,
    # as indices among the full tree's candidates, ascending and closed under parents; its own
    # tree is the full tree cut down to them (``candidates`` are theirs, in this order). Empty:
    # the tree is the tree set's ``tree_size`` one.
    tree_nodes: list[int] = []


class SchedulerOutput(msgspec.Struct, kw_only=True):
    step_id: int
    seqs: list[ScheduledSeq]
    # Run the Medusa heads for the next step. The scheduler turns this off when its policy
    # expects the next step to decode without speculation: then the step does exactly the
    # work of an engine built without speculation (no proposals nobody reads).
    propose: bool = True

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) + len(s.candidates) for s in self.seqs)


class SeqResult(msgspec.Struct, kw_only=True, array_like=True):
    seq_id: int
    # New tokens: accepted candidates followed by the bonus (model-sampled) token.
    sampled_token_ids: list[int]
    # Candidates of the full tree for the next step (empty without proposals, or when the step
    # deferred them: StepResult.candidates_deferred).
    next_candidates: list[int] = []
    logprobs: list[float] = []
    # Per sampled token, the top_logprobs most likely [token id, logprob] pairs there.
    top_logprobs: list[list[tuple[int, float]]] = []
    # Number of tree candidates accepted (len(sampled_token_ids) - 1 for a decode step).
    num_accepted: int = 0
    # Per tree depth: was a candidate at that depth accepted (for per-head acceptance rates).
    accepted_per_depth: list[int] = []
    # With speculative.adaptive: per next candidate, the heads' probability of it given its
    # parent (node 0 the root) — what the adaptive policy sizes the next tree by.
    next_confidence: list[float] = []


class StepResult(msgspec.Struct, kw_only=True):
    step_id: int
    results: list[SeqResult]
    # The step captured a CUDA graph (only before the engine's graphs are sealed, i.e. during
    # start-up's own steps): its time is not the step's cost, and the policy must not learn from it.
    captured: bool = False
    # Parts of the step (forward, decision tail, proposal) that had no CUDA graph of their
    # shape and ran eagerly, the engine's graphs being sealed after start-up: a served step
    # never captures (engine/worker/cuda_graphs.py), so a shape start-up missed costs eager time.
    graph_misses: int = 0
    # The step's proposals were still running on the device when its tokens came back: every
    # result's next_candidates come from the executor's take_candidates(), in result order
    # (in-process execution only; ModelRunner.execute's defer_candidates).
    candidates_deferred: bool = False


class Drafts(msgspec.Struct, kw_only=True):
    """A step's deferred proposals (``StepResult.candidates_deferred``, the executor's
    ``take_candidates()``), one list per result in result order: the next candidates and, with
    adaptive trees, each candidate's confidence (``SeqResult.next_confidence``)."""
    candidates: list[list[int]]
    confidence: list[list[float]] = []


ENCODER = msgspec.msgpack.Encoder()
SCHEDULER_OUTPUT_DECODER = msgspec.msgpack.Decoder(SchedulerOutput)
STEP_RESULT_DECODER = msgspec.msgpack.Decoder(StepResult)
