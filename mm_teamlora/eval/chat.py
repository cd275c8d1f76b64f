"""Answer one question about zero or more images, with the prompt built exactly as in training."""

from __future__ import annotations

import torch

from ..constants import IMAGE_PLACEHOLDER
from ..data.errors import RecordProblem
from ..data.images import load_image
from ..data.templates import ConversationTemplate
from ..model.multimodal import MultimodalLM


def answer(model: MultimodalLM, question: str, images: list[str] = (), template: str = "chat",
           max_new_tokens: int = 128, temperature: float = 0.0) -> str:
    """Greedy (temperature 0) or sampled answer. `<image>` marks where each image goes; without
    any, the images are put before the question (as LLaVA does)."""
    placeholders = question.count(IMAGE_PLACEHOLDER)
    if placeholders == 0:
        question = f"{IMAGE_PLACEHOLDER}\n" * len(images) + question
    elif placeholders != len(images):
        raise ValueError(f"the question has {placeholders} {IMAGE_PLACEHOLDER} marks but {len(images)} images were given")
    pixels = []
    for path in images:
        try:
            pixels.append(model.vision_tower.preprocess(load_image(path)))
        except RecordProblem as e:
            raise ValueError(f"cannot use image {path}: {e}") from None
    ids = ConversationTemplate(template, model.tokenizer).encode_prompt([{"role": "user", "content": question}])
    input_ids = torch.tensor([ids])
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    new = model.generate(input_ids, torch.ones_like(input_ids), torch.stack(pixels) if pixels else None,
                         torch.tensor([len(pixels)]), max_new_tokens=max_new_tokens, **sampling)
    return model.tokenizer.decode(new[0], skip_special_tokens=True).strip()
