"""From a model's answer to an option letter: free-text extraction and the letters' token ids.

`extract_letter(text, options)` tries, in order, and returns the first rule that gives one letter:
1. the whole answer is a letter, bare or dressed: `B`, `B.`, `(B)`, `[B]`, `**B**`, `B)`;
2. it starts with a lettered option the way prompts list them: `B. red`, `(B) red`, `B) red`, `B: red`;
3. `answer is X` / `answer: X` / `option X` / `choice X` (last occurrence; the letter may be bracketed);
4. exactly one distinct option letter stands alone among the last `LAST_WORDS` words (`A` and
   `I` only when not followed by a lowercase word, where they are English words: "A cat");
5. exactly one option's text occurs in the answer as whole words (case- and punctuation-
   insensitive), after dropping options whose text lies inside another matching option's text.
Otherwise None: the answer counts as unparsed (and wrong). Letters outside the row's options never
count.
"""

from __future__ import annotations

import re

from ..constants import IGNORE_INDEX

LAST_WORDS = 4
_DRESSED = re.compile(r"^[\s*_`\"'(\[{]*([A-Z])[\s*_`\"')\]}.:,;!]*$")
_LEADING = re.compile(r"^[\s*_`\"']*(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.):])\s*\S")
_STATED = re.compile(r"(?:answer(?:\s+is)?|option|choice)\s*(?:is\s*)?[:\-]?\s*[*_`\"'(\[]*([A-Z])(?![A-Za-z])",
                     re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z0-9']+")


def _normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.casefold()))


def extract_letter(text: str, options: dict[str, str] | str) -> str | None:
    """The option letter an answer names, or None (see the module doc). `options`: letter -> text
    (or just the valid letters, which disables rule 5)."""
    letters = set(options)
    text = (text or "").strip()
    if not text:
        return None
    match = _DRESSED.match(text)
    if match and match.group(1) in letters:
        return match.group(1)
    match = _LEADING.match(text)
    if match:
        letter = next(g for g in match.groups() if g)
        if letter in letters:
            return letter
    stated = [m.group(1) for m in _STATED.finditer(text) if m.group(1) in letters]
    if stated:
        return stated[-1]
    found = _letters_near_end(text, letters)
    if len(found) == 1:
        return found.pop()
    if isinstance(options, dict):
        return _match_option_text(text, options)
    return None


def _letters_near_end(text: str, letters: set[str]) -> set[str]:
    words = list(re.finditer(r"\S+", text))[-LAST_WORDS:]
    found = set()
    for i, word in enumerate(words):
        core = word.group().strip("*_`\"'()[]{}.,:;!?")
        if len(core) != 1 or core not in letters:
            continue
        following = words[i + 1].group() if i + 1 < len(words) else ""
        punctuated = word.group().rstrip("*_`\"')]}") != core  # "A.", "(A", "A,"
        if core in "AI" and not punctuated and following[:1].islower():
            continue  # "A cat", "I think": English words, not option letters
        found.add(core)
    return found


def _match_option_text(text: str, options: dict[str, str]) -> str | None:
    answer = f" {_normalise(text)} "
    matches = {}
    for letter, option in options.items():
        norm = _normalise(option)
        if norm and f" {norm} " in answer:
            matches[letter] = norm
    kept = [k for k, v in matches.items() if not any(v != w and f" {v} " in f" {w} " for w in matches.values())]
    return kept[0] if len(kept) == 1 else None


def letter_token_ids(template, letters: str) -> dict[str, int]:
    """The token id each letter starts with when it is the whole answer, as the template tokenises
    answers in training (answer pieces are tokenised apart from the prompt, so e.g. a SentencePiece
    tokenizer gives '▁A' and a byte-level BPE gives 'A', not ' A'). Raises ValueError when two
    letters start with the same token (likelihood scoring could not tell them apart)."""
    conversations = [[{"role": "user", "content": "?"}, {"role": "assistant", "content": letter}]
                     for letter in letters]
    ids = {}
    for letter, encoded in zip(letters, template.encode(conversations)):
        if isinstance(encoded, Exception):
            raise ValueError(f"template {template.name!r} cannot render the answer {letter!r}: {encoded}")
        supervised = [t for t in encoded[1] if t != IGNORE_INDEX]
        if not supervised:
            raise ValueError(f"template {template.name!r} gives the answer {letter!r} no tokens")
        ids[letter] = supervised[0]
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"the option letters share first tokens under template {template.name!r}: {ids}")
    return ids
