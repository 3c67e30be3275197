"""Trace-driven simulation of expert caching and prefetching."""

from .simulator import SimConfig, SimResult, simulate
from .trace import Trace, TraceMeta, load_trace, save_trace

__all__ = ["SimConfig", "SimResult", "Trace", "TraceMeta", "load_trace", "save_trace", "simulate"]
