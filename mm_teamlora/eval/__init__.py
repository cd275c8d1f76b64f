"""Evaluation and inference on top of the model and data rooms: chat answers, MMBench evaluation
(TSV reading, prompts, likelihood / generate answers, CircularEval, reports), routing analysis and
the causal expert-masking test of the visual / textual split (`ablation`)."""

from .ablation import ablate, ablation_markdown, answer_losses, choose_experts
from .answers import extract_letter, letter_token_ids
from .chat import answer
from .mmbench import (ROTATION_STRIDE, MMBenchData, MMBenchQuestion, PromptConfig, encode_question, prompt_text,
                      read_mmbench)
from .routing import analyse, inspect_routing, record_samples, routing_summary_line
from .separation import mutual_information_bits, separation
from .runner import EvalConfig, EvalResult, ImageFeatureCache, evaluate, rescore
from .scoring import format_markdown, percent, read_predictions, score, summary_line

__all__ = [
    "ablate", "ablation_markdown", "answer_losses", "choose_experts",
    "answer", "extract_letter", "letter_token_ids", "ROTATION_STRIDE", "MMBenchData", "MMBenchQuestion",
    "PromptConfig", "encode_question", "prompt_text", "read_mmbench", "analyse", "inspect_routing",
    "mutual_information_bits", "record_samples", "routing_summary_line", "separation", "EvalConfig", "EvalResult",
    "ImageFeatureCache", "evaluate", "rescore", "format_markdown", "percent", "read_predictions", "score",
    "summary_line",
]
