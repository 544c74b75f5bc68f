"""medusa-engine: a paged-KV, continuous-batching inference engine with Medusa speculative
decoding. The public API:

    from engine import Engine, SamplingParams
"""

from engine.engine import Engine, EngineStats
from engine.request import RequestOutput
from engine.sampling import SamplingParams

__all__ = ["Engine", "EngineStats", "RequestOutput", "SamplingParams"]
