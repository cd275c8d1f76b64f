"""The offline test tokenizer: a small byte-level BPE with a ChatML chat template (as SmolLM2 uses).

For tests, examples and the `tiny-random` model preset; no model is trained with it. It round-trips
any text exactly (byte-level), has the special tokens a chat model needs, and is built in
milliseconds from a fixed corpus, so no hub download is needed. It sits at the package root, below
the model and data rooms, so both (and the tests) reach it without one importing the other.
"""

from __future__ import annotations

from functools import lru_cache

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
_CORPUS = [  # fixed: the tiny-random preset's vocabulary depends on it (not on today's prompt constants)
    "The quick brown fox jumps over the lazy dog.",
    "What is shown in the image? Answer with the option's letter from the given choices directly.",
    "A red circle, a blue square and a green triangle on a white background.",
    "user assistant system image question answer hint options A B C D",
    "Describe the picture. How many objects are there? Which color is the shape?",
    "0123456789 digits numbers count the items in the photo",
]


@lru_cache(maxsize=None)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 384):
    """A `PreTrainedTokenizerFast` with ChatML, `<|im_end|>` as EOS and `<pad>` as padding."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
