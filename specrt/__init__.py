"""specrt: speculative decoding with task-aware heterogeneous drafters.

    import specrt
    engine = specrt.Engine.from_pretrained()
    out = engine.generate(["What is the capital of France?"], specrt.SamplingParams(max_tokens=64))
"""
from specrt.engine import Engine, EngineConfig, RequestOutput, StreamEvent
from specrt.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "RequestOutput", "StreamEvent", "SamplingParams"]
__version__ = "0.1.0"
