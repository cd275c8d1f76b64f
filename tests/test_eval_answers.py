"""Letter extraction from generated answers, and the letters' token ids under a template."""

import pytest

from mm_teamlora.data.templates import ConversationTemplate
from mm_teamlora.eval.answers import extract_letter, letter_token_ids
from mm_teamlora.tiny_tokenizer import tiny_tokenizer

OPTIONS = {"A": "a red square", "B": "a blue circle", "C": "dark red", "D": "red"}


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), (" c. ", None), ("C.", "C"), ("(D)", "D"), ("**A**", "A"), ("[B]", "B"),
    ("B. a blue circle", "B"), ("(C) dark red", "C"), ("D) red", "D"),
    ("The answer is C.", "C"), ("I think the answer is (B), because it is round.", "B"),
    ("Answer: D", "D"), ("The correct option is B", "B"), ("My final choice is D.", "D"),
    ("Looking at the picture, I would say B", "B"),
    ("It is B, clearly.", "B"),
    ("A cat sits on the mat", None),  # 'A' as an English article, no option text
    ("I see a blue circle in the middle.", "B"),  # unique option text
    ("It is dark red.", "C"),  # 'red' lies inside 'dark red': the longer match wins
    ("Either B or C", None),  # two letters: ambiguous
    ("a red square and a blue circle", None),  # two option texts: ambiguous
    ("The answer is E", None),  # not an option of this row
    ("", None), ("   ", None), ("I do not know.", None),
])
def test_extract_letter(text, expected):
    assert extract_letter(text, OPTIONS) == expected


def test_letters_only_mode_skips_text_matching():
    assert extract_letter("a blue circle", "ABCD") is None
    assert extract_letter("B", "AB") == "B" and extract_letter("C", "AB") is None


def test_letter_token_ids_follow_the_template_not_a_leading_space():
    tokenizer = tiny_tokenizer()
    ids = letter_token_ids(ConversationTemplate("chat", tokenizer), "ABCD")
    # byte-level BPE: the answer piece is tokenised apart from the prompt, so 'A', not ' A'
    for letter, token in ids.items():
        assert token == tokenizer(letter, add_special_tokens=False)["input_ids"][0]
        assert token != tokenizer(" " + letter, add_special_tokens=False)["input_ids"][0]
    assert len(set(ids.values())) == 4


def test_letter_token_ids_refuse_letters_sharing_a_first_token():
    class SharedFirst:  # a template whose answers all start with the same token
        name = "fake"

        def encode(self, conversations):
            return [([1, 2, 3], [-100, 5, 6 + i]) for i, _ in enumerate(conversations)]

    with pytest.raises(ValueError, match="share first tokens"):
        letter_token_ids(SharedFirst(), "AB")
