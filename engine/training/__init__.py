"""Offline head training (self-distillation) and its prompt data; nothing in the serving path
imports it."""
