"""Continuous-batching scheduler: policy only, never tensors."""
