"""medusa-engine: a paged-KV, continuous-batching inference engine with Medusa speculative
decoding. The public API:

    from engine import Engine, SamplingParams

The names are imported on first use (PEP 562), so that importing a lower floor of the
package — ``engine.sampling``, which ``spec_decode.acceptance`` builds on — does not pull in
the whole engine first: ``from spec_decode.acceptance import register_rule`` before anything
from ``engine`` was an import circle (acceptance → engine → engine.engine → model runner →
acceptance, half initialised).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
    from engine.engine import Engine, EngineStats
    from engine.request import RequestOutput
    from engine.sampling import SamplingParams

_PUBLIC = {"Engine": "engine.engine", "EngineStats": "engine.engine", "RequestOutput": "engine.request",
           "SamplingParams": "engine.sampling"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
