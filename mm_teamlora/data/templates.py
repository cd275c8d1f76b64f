"""Conversation templates: a checked conversation -> token ids and labels.

A template renders a conversation into `Piece`s of text, each supervised or not; a supervised piece
is exactly one assistant answer followed by the template's end-of-turn token (without it the model
never learns to stop). Pieces are tokenised separately, so the labelled tokens are, by
construction, the tokens of answer + end-of-turn and nothing else: the "tokenization mismatch" of
LLaVA (labels computed from separately counted prompt lengths, silently zeroing the loss when the
counts disagree) cannot happen. It is also how generation sees the text: the prompt is tokenised on
its own and the answer is generated after it; `ConversationTemplate.encode_prompt` builds that
prompt with the same pieces.

`<image>` inside a piece splits it too: each becomes one `IMAGE_PLACEHOLDER_ID`, labelled
`IGNORE_INDEX`, which the model replaces by `image_token_count` feature tokens.

Templates:
- `chat`: the tokenizer's own chat template (SmolLM2 and Qwen use ChatML). Each answer is located by
  rendering the conversation up to it with `add_generation_prompt=True` (which must be a prefix of
  the full rendering) and finding the answer text after it; the end-of-turn token is the special
  token the template writes right after the answer (spaces between are kept in the label).
- `vicuna_v1` (LLaVA-1.5): `SYSTEM USER: q ASSISTANT: a</s>USER: ...` with the tokenizer's EOS
  as `</s>`, its BOS first when it adds one; the prompt piece ends with `ASSISTANT: ` (the space
  belongs to the prompt, so the answer's first token carries no leading space).
- `plain` (projector pre-training, LLaVA's `plain`): the images, then the answer + EOS; only the
  answer and EOS are supervised; the user's text is dropped by design; one exchange only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from ..constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER_ID
from .errors import ConfigError, RecordProblem

TEMPLATES = ("chat", "vicuna_v1", "plain")
_SPACES = re.compile(r"[ \t]*")
_MARK = "\x00"  # brackets the answer markers of the chat fast path (text holding one takes the slow path)
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class Piece:
    text: str
    supervised: bool = False


class ConversationTemplate:
    """Renders and tokenises conversations for one template and one tokenizer."""

    def __init__(self, name: str, tokenizer, system_prompt: str | None = None):
        if name not in TEMPLATES:
            raise ConfigError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
        if name == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("template 'chat' needs a tokenizer with a chat template, and this tokenizer has "
                              "none; set one (tokenizer.chat_template = ...) or use vicuna_v1 or plain")
        if name != "chat" and not tokenizer.eos_token:
            raise ConfigError(f"template {name!r} ends answers with the EOS token; the tokenizer has none")
        self.name, self.tokenizer, self.system_prompt = name, tokenizer, system_prompt
        specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                         if t.special}
        specials -= {tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token} - {tokenizer.eos_token}
        # longest first so that a token which extends another wins
        self.end_tokens = sorted((s for s in specials if s), key=len, reverse=True)
        self.prefix_ids = [] if name == "chat" else leading_special_ids(tokenizer)

    # rendering -------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> list[Piece]:
        """Pieces of one conversation (checked as in `sources.check_conversation`)."""
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        if self.name == "chat":
            return self._render_chat(messages, add_generation_prompt)
        if self.name == "vicuna_v1":
            return self._render_vicuna(messages, add_generation_prompt)
        return self._render_plain(messages, add_generation_prompt)

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja's raise_exception and template bugs
            raise RecordProblem("template_mismatch", f"chat template: {type(e).__name__}: {e}") from None

    def _render_chat(self, messages: list[dict], add_generation_prompt: bool) -> list[Piece]:
        full = self._apply(messages, add_generation_prompt)
        return self._chat_by_markers(messages, full, add_generation_prompt) or \
            self._chat_by_prefixes(messages, full)

    def _chat_by_markers(self, messages: list[dict], full: str, add_generation_prompt: bool) -> list[Piece] | None:
        """Fast path, two renderings whatever the number of turns: render with each answer replaced
        by a marker, put the answers back, and use the result only if it equals the real rendering
        (a template whose output depends on the answers' text falls back to `_chat_by_prefixes`)."""
        if _MARK in full:
            return None
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        marked = [dict(m, content=f"{_MARK}{i}{_MARK}") if i in answers else m for i, m in enumerate(messages)]
        try:
            parts = re.split(f"{_MARK}(\\d+){_MARK}", self._apply(marked, add_generation_prompt))
        except RecordProblem:
            return None
        if [int(p) for p in parts[1::2]] != answers:
            return None
        pieces, text = [], parts[0]
        for turn, after in zip(answers, parts[2::2]):
            answer, following = messages[turn]["content"], text + messages[turn]["content"] + after
            try:
                end = self._end_of_turn(following, len(text) + len(answer), turn)
            except RecordProblem:
                return None  # the slow path decides, on the real rendering
            pieces += [Piece(text), Piece(following[len(text):end], True)]
            text = following[end:]
        pieces.append(Piece(text))
        return pieces if "".join(p.text for p in pieces) == full else None

    def _chat_by_prefixes(self, messages: list[dict], full: str) -> list[Piece]:
        """Exact for any prefix-stable template: each answer starts after the rendering of the
        conversation before it with `add_generation_prompt=True`."""
        pieces, pos = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._apply(messages[:i], True)
            if not full.startswith(prompt) or len(prompt) < pos:
                raise RecordProblem("template_mismatch", f"turn {i}: the chat template renders the conversation "
                                                         "differently from its prompt up to this turn")
            start = full.find(message["content"], len(prompt))
            if start < 0:
                raise RecordProblem("template_mismatch", f"turn {i}: the chat template changes the answer text")
            end = self._end_of_turn(full, start + len(message["content"]), i)
            pieces += [Piece(full[pos:start]), Piece(full[start:end], True)]
            pos = end
        return pieces + [Piece(full[pos:])]

    def _end_of_turn(self, text: str, pos: int, turn: int) -> int:
        pos = _SPACES.match(text, pos).end()
        for token in self.end_tokens:
            if text.startswith(token, pos):
                return pos + len(token)
        raise RecordProblem("template_mismatch", f"turn {turn}: the chat template writes {text[pos:pos + 20]!r} "
                                                 "after the answer, not a special end-of-turn token")

    def _render_vicuna(self, messages: list[dict], add_generation_prompt: bool) -> list[Piece]:
        system = messages[0]["content"] if messages[0]["role"] == "system" else VICUNA_SYSTEM
        turns = messages[1:] if messages[0]["role"] == "system" else messages
        eos = self.tokenizer.eos_token
        pieces, prompt = [], system + " "
        for message in turns:
            if message["role"] == "user":
                prompt += f"USER: {message['content']} ASSISTANT: "
            else:
                pieces += [Piece(prompt), Piece(message["content"] + eos, True)]
                prompt = ""
        return pieces + [Piece(prompt if add_generation_prompt else "")]

    def _render_plain(self, messages: list[dict], add_generation_prompt: bool) -> list[Piece]:
        turns = [m for m in messages if m["role"] != "system"]
        if len(turns) != (1 if add_generation_prompt else 2):
            raise RecordProblem("template_mismatch",
                                f"plain takes one user and one assistant turn, got {len(turns)} turns")
        images = Piece(IMAGE_PLACEHOLDER * turns[0]["content"].count(IMAGE_PLACEHOLDER))
        if add_generation_prompt:
            return [images]
        return [images, Piece(turns[1]["content"] + self.tokenizer.eos_token, True)]

    # tokenising ------------------------------------------------------------------------------
    def encode(self, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]] | RecordProblem]:
        """(input_ids, labels) per conversation, or the `RecordProblem` that stopped it. All text
        pieces of the batch go to the tokenizer in one call (fast tokenizers run it in parallel);
        when that call fails, each conversation is tokenised alone, so one text the tokenizer
        rejects fails only its own record (`invalid_text`)."""
        rendered = []
        for messages in conversations:
            try:
                rendered.append(self.render(messages))
            except RecordProblem as problem:
                rendered.append(problem)
        try:
            return encode_pieces([r for r in rendered if not isinstance(r, RecordProblem)], self.tokenizer,
                                 self.prefix_ids, problems=rendered)
        except Exception:  # a tokenizer error on one text of the batch: find it, one record at a time
            return [r if isinstance(r, RecordProblem) else self._encode_alone(r) for r in rendered]

    def _encode_alone(self, pieces: list[Piece]) -> tuple[list[int], list[int]] | RecordProblem:
        try:
            return encode_pieces([pieces], self.tokenizer, self.prefix_ids)[0]
        except Exception as e:  # tokenizers raise TypeError, ValueError, ... on text they cannot take
            return RecordProblem("invalid_text", f"the tokenizer fails on it: {type(e).__name__}: {e}"[:300])

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a generation prompt (messages ending with the user), tokenised exactly as in
        training, so the model continues where its training answers started."""
        return encode_pieces([self.render(messages, add_generation_prompt=True)], self.tokenizer, self.prefix_ids)[0][0]


def encode_pieces(batch: list[list[Piece]], tokenizer, prefix_ids: list[int],
                  problems: list | None = None) -> list:
    """Tokenise each piece list: text pieces split at `<image>`, one placeholder id per image.
    With `problems` (a list of piece lists and RecordProblems), results keep its order and
    problems pass through."""
    chunks, plans = [], []
    for pieces in batch:
        plan = []
        for piece in pieces:
            for j, part in enumerate(piece.text.split(IMAGE_PLACEHOLDER)):
                if j:
                    plan.append(None)
                if part:
                    plan.append((len(chunks), piece.supervised))
                    chunks.append(part)
        plans.append(plan)
    token_ids = tokenizer(chunks, add_special_tokens=False)["input_ids"] if chunks else []
    encoded = []
    for plan in plans:
        ids, labels = list(prefix_ids), [IGNORE_INDEX] * len(prefix_ids)
        for step in plan:
            if step is None:
                ids.append(IMAGE_PLACEHOLDER_ID)
                labels.append(IGNORE_INDEX)
            else:
                chunk = token_ids[step[0]]
                ids += chunk
                labels += chunk if step[1] else [IGNORE_INDEX] * len(chunk)
        encoded.append((ids, labels))
    if problems is None:
        return encoded
    results = iter(encoded)
    return [p if isinstance(p, RecordProblem) else next(results) for p in problems]


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before text by itself (a BOS for Llama-style tokenizers)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start]
    return []


def sequence_length(input_ids: list[int], image_token_count: int | None) -> int:
    """Length the language model sees: each placeholder counts `image_token_count` tokens (which a
    text-only record does not need to know)."""
    images = sum(1 for t in input_ids if t == IMAGE_PLACEHOLDER_ID)
    return len(input_ids) + images * (image_token_count - 1) if images else len(input_ids)


def truncate_tail(input_ids: list[int], labels: list[int], max_length: int,
                  image_token_count: int) -> tuple[list[int], list[int]]:
    """The longest prefix that fits in `max_length`; an image is kept whole or dropped with all
    that follows, never cut."""
    total = 0
    for k, token in enumerate(input_ids):
        total += image_token_count if token == IMAGE_PLACEHOLDER_ID else 1
        if total > max_length:
            return input_ids[:k], labels[:k]
    return input_ids, labels


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes token ids: vocabulary, merges, added
    tokens, normaliser (the fast tokenizer's JSON), special tokens and the chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.special_tokens_map,
             leading_special_ids(tokenizer)]
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()
