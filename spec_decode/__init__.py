"""Medusa speculative decoding: heads, candidate trees, proposer, acceptance rules, training."""
