"""Evaluation and inference on top of the model and data rooms: chat answers (MMBench and routing
analysis come here next)."""

from .chat import answer

__all__ = ["answer"]
