"""Tiny multimodal batches for the model tests."""

import torch
from PIL import Image

from mm_teamlora.constants import IMAGE_PLACEHOLDER_ID


def colour_image(seed: int, size=(40, 28)) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with one IMAGE_PLACEHOLDER_ID at each <image>."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split("<image>")):
        if i:
            ids.append(IMAGE_PLACEHOLDER_ID)
        if chunk:
            ids += tokenizer(chunk, add_special_tokens=False)["input_ids"]
    return ids


def make_batch(model, texts: list[str], image_seeds: list[list[int]], padding_side="right"):
    tok = model.tokenizer
    rows = [encode(tok, t) for t in texts]
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), tok.pad_token_id)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    images = [model.vision_tower.preprocess(colour_image(s)) for seeds in image_seeds for s in seeds]
    pixel_values = torch.stack(images) if images else None
    counts = torch.tensor([len(s) for s in image_seeds])
    return ids, mask, pixel_values, counts
