"""Acceptance rules: which path of a verified tree to keep, and the bonus token after it.

Inputs for one sequence: ``node_tokens`` [N] (root = the pending token, then one candidate per
tree node), ``logits`` [N, V] (the model at every node: row i predicts the token after node i).
Output: the accepted node ids (starting with the root) and the bonus token sampled from the
model at the last accepted node. Randomness is keyed by the produced token's position.

- greedy (exact match): a candidate is accepted while it equals the model's argmax at its
  parent; output equals plain greedy decoding token for token. With temperature > 0 the
  "argmax" is the keyed sample plain decoding would draw there, so output still equals plain
  decoding with the same seed, token for token.
- typical (Medusa): accept x at a node if p(x) > min(epsilon, alpha * exp(-H(p))) with p the
  model's processed distribution at the parent; the longest accepted path wins, ties go to
  the higher path likelihood.
- rejection (SpecInfer-style multi-candidate speculative sampling with deterministic drafts):
  at a node, try its children in rank order: accept child x with probability p(x), else zero
  p(x) and renormalise; if all are rejected, sample the next token from what remains. The
  token distribution equals plain sampling from p at every position.
Greedy requests (temperature 0) always use the greedy rule: for them all three coincide.

Rules are registered by name (``ACCEPTANCE_RULES``): config, sampling parameters and the CLI
take their choices from there, so a new rule is one function plus one ``register_rule``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.sampling import SamplingParams, position_generator, processed_probs, sample_token
from spec_decode.tree import MedusaTree


@dataclass
class Accepted:
    path: list[int]  # node ids, root first
    bonus: int


@dataclass(frozen=True)
class AcceptanceRule:
    name: str
    # (tree, node_tokens, logits, params, seed, first_pos, epsilon, alpha) -> Accepted
    accept: Callable[..., Accepted]
    # Output tokens follow plain sampling's distribution exactly (greedy: the same tokens).
    lossless: bool
    summary: str


ACCEPTANCE_RULES: dict[str, AcceptanceRule] = {}


def register_rule(name: str, lossless: bool, summary: str):
    def add(fn: Callable[..., Accepted]) -> Callable[..., Accepted]:
        if name in ACCEPTANCE_RULES:
            raise ValueError(f"acceptance rule {name!r} is registered twice")
        ACCEPTANCE_RULES[name] = AcceptanceRule(name, fn, lossless, summary)
        return fn
    return add


def _best_path(tree: MedusaTree, ok: torch.Tensor, score: torch.Tensor | None = None) -> list[int]:
    """ok: [P, D] per path and depth, was the edge into that depth accepted."""
    acc_len = ok.int().cumprod(dim=1).sum(dim=1)
    key = acc_len.double()
    if score is not None:
        # Among the longest, prefer the likeliest: score is the accepted prefix's log-likelihood.
        key = key * 1e6 + score
    best = int(torch.argmax(key))
    return tree.paths[best, : int(acc_len[best]) + 1].tolist()


def _edges(tree: MedusaTree, node_tokens: torch.Tensor):
    return _path_edges(tree.paths.to(node_tokens.device))


def _path_edges(paths: torch.Tensor):
    """(parent, child, valid) [P, D] for every edge along every root-to-leaf path."""
    valid = paths[:, 1:] >= 0
    p = paths.clamp(min=0)
    return p[:, :-1], p[:, 1:], valid


def accept_exact(tree: MedusaTree, node_tokens: torch.Tensor, logits: torch.Tensor,
                 params: SamplingParams, seed: int, first_pos: int) -> Accepted:
    """Accept while the candidate equals the token plain decoding draws at its parent (the
    argmax when greedy; with temperature, the keyed sample — so even sampled output is the
    very same token sequence as without speculation)."""
    if params.greedy:
        target = logits.argmax(dim=-1)
    else:
        probs = processed_probs(logits, params)
        target = torch.tensor([sample_token(probs[i], params, seed, first_pos + tree.depths[i])
                               for i in range(tree.num_nodes)], device=logits.device)
    parent, child, valid = _edges(tree, node_tokens)
    ok = (node_tokens[child] == target[parent]) & valid
    path = _best_path(tree, ok.cpu())
    return Accepted(path, int(target[path[-1]]))


def greedy_tree_accept(paths: torch.Tensor, node_tokens: torch.Tensor,
                       argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance on the device, no host sync (CUDA graphs capture it): ``paths`` is
    ``tree.paths`` on the device, node_tokens and argmax [S, N]. Returns per sequence the
    index of the accepted path in ``paths`` and how many candidates on it were accepted
    (the first longest path wins, as in ``accept_exact``)."""
    parent, child, valid = _path_edges(paths)
    ok = (node_tokens[:, child] == argmax[:, parent]) & valid  # [S, P, D]
    acc_len = ok.int().cumprod(dim=2).sum(dim=2)  # [S, P]
    best = acc_len.argmax(dim=1)
    return best, acc_len.gather(1, best[:, None])[:, 0]


def accept_greedy_batch(tree: MedusaTree, node_tokens: torch.Tensor, logits: torch.Tensor) -> list[Accepted]:
    """Greedy acceptance for S sequences sharing ``tree`` at once (node_tokens [S, N], logits
    [S, N, V]): one pass on the device and one copy to the host, instead of a few small syncs
    per sequence. Same result as ``accept_exact`` on each sequence (first longest path wins)."""
    argmax = logits.argmax(dim=-1)  # [S, N]
    best, best_len = greedy_tree_accept(tree.paths.to(node_tokens.device), node_tokens, argmax)
    best, best_len, argmax = best.tolist(), best_len.tolist(), argmax.tolist()
    out = []
    for i, (b, n) in enumerate(zip(best, best_len)):
        path = tree.paths[b, : n + 1].tolist()
        out.append(Accepted(path, argmax[i][path[-1]]))
    return out


def accept_typical(tree: MedusaTree, node_tokens: torch.Tensor, logits: torch.Tensor,
                   params: SamplingParams, seed: int, first_pos: int, epsilon: float,
                   alpha: float) -> Accepted:
    probs = processed_probs(logits, params)
    entropy = -(probs * torch.log(probs.clamp_min(1e-10))).sum(-1)
    threshold = torch.clamp(alpha * torch.exp(-entropy), max=epsilon)
    parent, child, valid = _edges(tree, node_tokens)
    cand_p = probs[parent, node_tokens[child]]
    ok = (cand_p > threshold[parent]) & valid
    loglik = (torch.log(cand_p.clamp_min(1e-30)) * ok.int().cumprod(1)).sum(1)
    path = _best_path(tree, ok.cpu(), loglik.double().cpu())
    last = path[-1]
    bonus = sample_token(probs[last], params, seed, first_pos + tree.depths[last])
    return Accepted(path, bonus)


def accept_rejection(tree: MedusaTree, node_tokens: torch.Tensor, logits: torch.Tensor,
                     params: SamplingParams, seed: int, first_pos: int) -> Accepted:
    probs = processed_probs(logits, params)
    tokens = node_tokens.tolist()
    node, path = 0, [0]
    while True:
        gen = position_generator(seed, first_pos + tree.depths[node], probs.device)
        p = probs[node].clone()
        nxt = None
        for child in tree.children[node]:
            x = tokens[child]
            u = torch.rand((), generator=gen, device=p.device)
            if u < p[x]:
                nxt = child
                break
            p[x] = 0.0
            total = p.sum()
            if total <= 0:
                break
            p = p / total
        if nxt is None:
            return Accepted(path, int(torch.multinomial(p, 1, generator=gen)))
        path.append(nxt)
        node = nxt


register_rule("greedy", lossless=True, summary="exact match with plain decoding's token")(
    lambda tree, tokens, logits, params, seed, first_pos, epsilon, alpha:
    accept_exact(tree, tokens, logits, params, seed, first_pos))
register_rule("typical", lossless=False, summary="Medusa's typical acceptance (entropy-scaled threshold)")(
    accept_typical)
register_rule("rejection", lossless=True, summary="multi-candidate speculative sampling")(
    lambda tree, tokens, logits, params, seed, first_pos, epsilon, alpha:
    accept_rejection(tree, tokens, logits, params, seed, first_pos))


def accept(rule: str, tree: MedusaTree, node_tokens: torch.Tensor, logits: torch.Tensor,
           params: SamplingParams, seed: int, first_pos: int, epsilon: float = 0.09,
           alpha: float = 0.3) -> Accepted:
    """Dispatch on the rule; ``first_pos`` is the position of the token the root's row predicts.
    Greedy requests always take the greedy rule (for them every rule coincides)."""
    name = "greedy" if params.greedy else rule
    if name not in ACCEPTANCE_RULES:
        raise ValueError(f"acceptance: unknown rule {rule!r}; known: {sorted(ACCEPTANCE_RULES)}")
    return ACCEPTANCE_RULES[name].accept(tree, node_tokens, logits, params, seed, first_pos, epsilon, alpha)
