"""The trainable projector from vision features to the language model's embedding space.

`linear`: one Linear (LLaVA-1.0). `mlp2x_gelu`: Linear -> GELU -> Linear (LLaVA-1.5); its
state-dict keys `0.*` and `2.*` match LLaVA's `mm_projector` layout.
"""

from __future__ import annotations

from torch import nn

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


def build_projector(projector_type: str, vision_hidden: int, lm_hidden: int) -> nn.Module:
    if projector_type == "linear":
        return nn.Linear(vision_hidden, lm_hidden)
    if projector_type == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_hidden, lm_hidden), nn.GELU(), nn.Linear(lm_hidden, lm_hidden))
    raise ValueError(f"projector_type={projector_type!r}; allowed: {', '.join(PROJECTOR_TYPES)}")
