"""Chat sessions, image preparation and offload planning over llama-cpp-python's mtmd path."""

from .batch import BatchReply, BatchRequest
from .chat import TurnStats, VisionChat
from .offload import OffloadPlan, parse_size, plan, plan_offload, shape_from_gguf, shape_from_preset

__all__ = ["VisionChat", "BatchRequest", "BatchReply", "TurnStats", "OffloadPlan", "plan", "plan_offload", "parse_size", "shape_from_gguf",
           "shape_from_preset"]
