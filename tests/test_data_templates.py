"""Templates and labels: the labelled tokens decode to exactly each answer + its end-of-turn token,
for every template; lengths count image tokens; truncation never cuts an image nor leaves a
sample with nothing to learn, and is counted."""

import pytest

from fixtures.data.helpers import TOKENS_PER_IMAGE, build, config, llava, make_image, rows, tokenizer, write_json
from mm_teamlora.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER_ID
from mm_teamlora.data import ConfigError, ConversationTemplate, DataError, truncate_tail
from mm_teamlora.data.sources import Conversation, check_conversation
from mm_teamlora.data.templates import VICUNA_SYSTEM

ANSWERS = ["A red fox jumps.", "Ünïcödé ✓ 你好 🦊 — ok", "Line one.\nLine two:\n- item", "ASSISTANT: USER: <|im_start|>x",
           "What is shown?"]


def conversation(images=1, answers=ANSWERS):
    messages = []
    for i, answer in enumerate(answers):
        question = (IMAGE_PLACEHOLDER + "\n") * images + "What is shown?" if i == 0 else f"And then ({i})?"
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    conv = Conversation("c", messages, images=["x.png"] * images)
    check_conversation(conv)
    return conv.messages


def labelled_runs(labels):
    """Contiguous runs of supervised positions."""
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", ["chat", "vicuna_v1", "plain"])
@pytest.mark.parametrize("images", [0, 1, 2])
def test_labels_decode_to_exactly_the_answers_plus_end_of_turn(name, images):
    tok = tokenizer()
    template = ConversationTemplate(name, tok)
    answers = ANSWERS[:1] if name == "plain" else ANSWERS
    messages = conversation(images, answers)
    (ids, labels), = template.encode([messages])
    assert len(ids) == len(labels)
    runs = labelled_runs(labels)
    assert [tok.decode(run) for run in runs] == [a + tok.eos_token for a in answers]
    # labels are the input ids where supervised, and placeholders are never supervised
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    assert ids.count(IMAGE_PLACEHOLDER_ID) == images
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == IMAGE_PLACEHOLDER_ID)


def _decode_with_images(tok, ids):
    text, chunk = "", []
    for token in ids + [None]:
        if token is None or token == IMAGE_PLACEHOLDER_ID:
            text += tok.decode(chunk)
            chunk = []
            if token is not None:
                text += IMAGE_PLACEHOLDER
        else:
            chunk.append(token)
    return text


def test_chat_rendering_is_the_tokenizers_own():
    tok = tokenizer()
    messages = conversation(2)
    (ids, _), = ConversationTemplate("chat", tok).encode([messages])
    assert _decode_with_images(tok, ids) == tok.apply_chat_template(messages, tokenize=False)


def test_vicuna_and_plain_rendering():
    tok = tokenizer()
    messages = conversation(1, ["Fine.", "Yes."])
    (ids, _), = ConversationTemplate("vicuna_v1", tok).encode([messages])
    assert _decode_with_images(tok, ids) == (f"{VICUNA_SYSTEM} USER: <image>\nWhat is shown? ASSISTANT: Fine.<|im_end|>"
                                             "USER: And then (1)? ASSISTANT: Yes.<|im_end|>")
    (ids, labels), = ConversationTemplate("plain", tok).encode([conversation(1, ["A red square."])])
    assert ids[0] == IMAGE_PLACEHOLDER_ID and tok.decode(ids[1:]) == "A red square.<|im_end|>"
    assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]


@pytest.mark.parametrize("name", ["chat", "vicuna_v1", "plain"])
def test_generation_prompt_is_the_training_prefix(name):
    """The eval prompt tokenises exactly like the training text before the answer."""
    tok = tokenizer()
    template = ConversationTemplate(name, tok)
    messages = conversation(1, ANSWERS[:1] if name == "plain" else ANSWERS[:2])
    (ids, labels), = template.encode([messages])
    prompt = template.encode_prompt(messages[:-1])
    last_run_start = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX)
    assert ids[:last_run_start] == prompt


def test_other_chat_template_with_its_own_end_of_turn_token():
    """A Gemma-like template: turns end with <end_of_turn>, not the EOS."""
    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' "
                         "else m['role']) + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
    messages = conversation(1)
    (ids, labels), = ConversationTemplate("chat", tok).encode([messages])
    assert [tok.decode(run) for run in labelled_runs(labels)] == [a + "<end_of_turn>" for a in ANSWERS]


def test_chat_template_errors():
    tok = tokenizer()
    tok.chat_template = None
    with pytest.raises(ConfigError, match="has none"):
        ConversationTemplate("chat", tok)
    with pytest.raises(ConfigError, match="unknown template"):
        ConversationTemplate("llama9", tok)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    (problem,) = ConversationTemplate("chat", tok).encode([conversation(0, ["Hi."])])
    assert problem.reason == "template_mismatch" and "not a special end-of-turn token" in problem.detail


def test_plain_takes_one_exchange(tmp_path):
    path = write_json(tmp_path / "d.json", [llava("one"), {"id": "two", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "q"},
        {"from": "gpt", "value": "a"}]}])
    with pytest.raises(DataError, match="record 1, id 'two': template_mismatch: plain takes one"):
        build(config([{"path": path}], template="plain"))


def test_system_prompt_is_added_when_missing():
    tok = tokenizer()
    (ids, _), = ConversationTemplate("chat", tok, system_prompt="Be brief.").encode([conversation(0, ["Ok."])])
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")


# lengths and truncation ---------------------------------------------------------------------------

def test_length_counts_image_tokens(tmp_path):
    make_image(tmp_path / "a.png")
    path = write_json(tmp_path / "d.json", [llava("a", question="<image>\n<image> q", images=["a.png", "a.png"])])
    (row,) = rows(build(config([{"path": path, "image_root": str(tmp_path)}])))
    assert row["length"] == len(row["input_ids"]) + 2 * (TOKENS_PER_IMAGE - 1)


@pytest.mark.parametrize("cut", range(0, TOKENS_PER_IMAGE + 1))
def test_truncate_tail_never_cuts_an_image(cut):
    ids = [5, 6, IMAGE_PLACEHOLDER_ID, 7, 8]
    labels = [IGNORE_INDEX] * 3 + [7, 8]
    kept, kept_labels = truncate_tail(ids, labels, 2 + cut, TOKENS_PER_IMAGE)
    assert kept == (ids[:3] if cut == TOKENS_PER_IMAGE else ids[:2])
    assert kept_labels == labels[:len(kept)]


def _long_records(tmp_path):
    make_image(tmp_path / "a.png")
    answer = " ".join(["word"] * 60)
    return write_json(tmp_path / "d.json", [
        llava("short", question="<image>\nq", answer="Yes.", image="a.png"),
        llava("long_answer", question="<image>\nq", answer=answer, image="a.png"),
        llava("long_question", question="<image>\n" + " ".join(["ask"] * 80), answer="Yes.", image="a.png"),
        llava("image_at_end", question="Look: " + " ".join(["ask"] * 12) + " <image>", answer="Yes.", image="a.png"),
    ])


def test_tail_truncation_is_counted_and_keeps_supervision(tmp_path):
    path = _long_records(tmp_path)
    mixture = build(config([{"path": path, "image_root": str(tmp_path)}], max_length=48, on_error="raise",
                           shuffle=False))
    report = mixture.reports[0]
    # image_at_end: the image does not fit, so the question is cut before it and the answer is gone
    assert report.skipped == {"no_supervised_tokens": 2} and report.kept == 2
    assert report.notes == {"truncated": 1}
    by_id = {r["id"]: r for r in rows(mixture)}
    assert set(by_id) == {"short", "long_answer"}
    long = by_id["long_answer"]
    assert long["length"] == 48 and any(label != IGNORE_INDEX for label in long["labels"])
    assert long["input_ids"].count(IMAGE_PLACEHOLDER_ID) == 1 == len(long["images"])


def test_truncation_that_drops_an_image_drops_its_path(tmp_path):
    make_image(tmp_path / "a.png")
    path = write_json(tmp_path / "d.json", [{"id": "two_images", "images": ["a.png", "a.png"], "conversations": [
        {"from": "human", "value": "<image>\nFirst."}, {"from": "gpt", "value": "One."},
        {"from": "human", "value": "<image>\nSecond."}, {"from": "gpt", "value": "Two."}]}])
    mixture = build(config([{"path": path, "image_root": str(tmp_path)}], max_length=2 * TOKENS_PER_IMAGE + 10))
    (row,) = rows(mixture)
    assert row["input_ids"].count(IMAGE_PLACEHOLDER_ID) == 1 and len(row["images"]) == 1
    assert mixture.reports[0].notes == {"truncated": 1, "truncated_images_dropped": 1}


def test_truncation_skip_policy_counts_too_long(tmp_path):
    path = _long_records(tmp_path)
    mixture = build(config([{"path": path, "image_root": str(tmp_path)}], max_length=48, truncation="skip"))
    assert mixture.reports[0].skipped == {"too_long": 3} and mixture.reports[0].kept == 1
    assert mixture.reports[0].examples["too_long"][0]["id"] == "long_answer"


def test_chat_fast_path_equals_the_prefix_path(monkeypatch):
    tok = tokenizer()
    template = ConversationTemplate("chat", tok)
    messages = conversation(2)
    fast = template.render(messages)
    monkeypatch.setattr(ConversationTemplate, "_chat_by_markers", lambda *a: None)
    assert template.render(messages) == fast
    assert template.encode([messages]) == ConversationTemplate("chat", tok).encode([messages])


def test_chat_template_that_depends_on_the_answer_falls_back(monkeypatch):
    """A template that writes a tag before answers starting with 'Q:' cannot be rendered with
    markers; the prefix path still labels exactly the answer + end-of-turn."""
    tok = tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                         "{% if m['content'].startswith('Q:') %}{{ '[quoted] ' }}{% endif %}"
                         "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    template = ConversationTemplate("chat", tok)
    calls = []
    slow = ConversationTemplate._chat_by_prefixes
    monkeypatch.setattr(ConversationTemplate, "_chat_by_prefixes", lambda *a: calls.append(1) or slow(*a))
    answers = ["Q: why?", "Plain answer."]
    (ids, labels), = template.encode([conversation(0, answers)])
    assert calls and [tok.decode(run) for run in labelled_runs(labels)] == [a + "<|im_end|>" for a in answers]
    assert "[quoted] " in tok.decode(ids)
