"""medusa-engine: a paged-KV, continuous-batching inference engine with Medusa speculative
decoding. The public API:

    from engine import Engine, SamplingParams

The names are imported on first use (PEP 562): importing a lower floor of the package (say
``engine.sample.acceptance`` to register a rule, or ``engine.core`` without torch) never pulls
in the whole engine first. docs/architecture.md maps the floors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
    from engine.core.request import RequestOutput
    from engine.core.sampling_params import SamplingParams
    from engine.engine import Engine, EngineStats

_PUBLIC = {"Engine": "engine.engine", "EngineStats": "engine.engine", "RequestOutput": "engine.core.request",
           "SamplingParams": "engine.core.sampling_params"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
