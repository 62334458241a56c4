"""pdserve's shared core: model, paged KV cache, sampling, scheduler, LLMEngine and the offline LLM."""

from engine.engine import EngineConfig, LLMEngine, StepOutput
from engine.finish import FinishReason
from engine.llm import LLM, RequestOutput
from engine.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "FinishReason", "LLMEngine", "RequestOutput", "SamplingParams", "StepOutput"]
