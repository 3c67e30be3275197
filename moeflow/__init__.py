"""moeflow: run and serve Mixture-of-Experts language models at the lowest cost per token."""

from .engine.sampling import SamplingParams
from .engine.sequence import RequestOutput, RequestStats
from .errors import MoeflowError
from .llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestStats", "MoeflowError"]
__version__ = "0.1.0"
