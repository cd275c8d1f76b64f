"""mm_teamlora: TeamLoRA for the language backbone of LLaVA-style vision-language models."""

__version__ = "0.1.0"
