"""Bad input: every case stops the run under `raise` (file, record, id, reason) and is counted by
reason under `skip`; good records around it are kept. Also the three source formats."""

import os
from collections import Counter

import pytest

from fixtures.data.helpers import (build, config, llava, make_bomb_png, make_image, make_truncated, rows,
                                   tokenizer, write_json, write_jsonl)
from mm_teamlora.constants import IMAGE_PLACEHOLDER_ID
from mm_teamlora.data import REASONS, DataError, build_mixture


def turns(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


# (case name, bad record, reason, text the raise message must contain)
RECORD_CASES = [
    ("not_an_object", ["a", "list"], "not_an_object", "got list"),
    ("bad_id", llava({"x": 1}), "bad_id", "id {'x': 1}"),
    ("missing_conversations", {"id": "bad"}, "missing_conversations", "conversations"),
    ("conversations_not_list", {"id": "bad", "conversations": "hi"}, "malformed_conversations", "not a list"),
    ("turn_not_object", {"id": "bad", "conversations": ["hi", "there"]}, "malformed_conversations", "turn 0"),
    ("turn_without_value", {"id": "bad", "conversations": [{"from": "human"}]}, "malformed_conversations", "turn 0"),
    ("empty_conversations", {"id": "bad", "conversations": []}, "empty_conversations", "empty"),
    ("value_not_string", {"id": "bad", "conversations": turns(("human", "q"), ("gpt", 5))}, "non_string_value", "turn 1"),
    ("role_not_string", {"id": "bad", "conversations": [{"from": 3, "value": "q"}]}, "non_string_value", "role 3"),
    ("unknown_role", {"id": "bad", "conversations": turns(("human", "q"), ("bot", "a"))}, "unknown_role", "'bot'"),
    ("user_twice", {"id": "bad", "conversations": turns(("human", "q"), ("human", "q"), ("gpt", "a"))},
     "role_order", "turn 1"),
    ("system_late", {"id": "bad", "conversations": turns(("human", "q"), ("system", "s"), ("gpt", "a"))},
     "role_order", "turn 1"),
    ("starts_with_assistant", {"id": "bad", "conversations": turns(("gpt", "a"), ("human", "q"))},
     "starts_with_assistant", "first turn"),
    ("ends_with_user", {"id": "bad", "conversations": turns(("human", "q"), ("gpt", "a"), ("human", "q2"))},
     "ends_with_user", "last"),
    ("empty_answer", llava("bad", answer=" \n\t "), "empty_answer", "turn 1"),
    ("empty_question", llava("bad", question="  "), "empty_question", "turn 0"),
    ("more_placeholders", llava("bad", question="<image> <image> q", image="good.png"), "image_count_mismatch",
     "2 <image> placeholders, 1 images"),
    ("placeholder_no_image", llava("bad", question="<image>\nq"), "image_count_mismatch", "1 <image>"),
    ("image_in_answer", llava("bad", question="<image>q", answer="see <image>", image="good.png"),
     "image_in_answer", "turn 1"),
    ("image_field_dict", llava("bad", image={"path": "good.png"}), "bad_image_field", "dict"),
    ("image_path_not_string", llava("bad", images=["good.png", 7]), "non_string_value", "7"),
    ("image_and_images", llava("bad", image="good.png", images=["good.png"]), "bad_image_field", "both"),
    ("absolute_path", llava("bad", image="/etc/hostname"), "absolute_image_path", "/etc/hostname"),
    ("escapes_root", llava("bad", image="../outside.png"), "image_path_escapes_root", "../outside.png"),
    ("escapes_root_nested", llava("bad", image="sub/../../outside.png"), "image_path_escapes_root", "outside"),
    ("image_missing", llava("bad", image="nope.png"), "image_missing", "nope.png"),
    ("image_empty_file", llava("bad", image="empty.png"), "image_empty_file", "empty.png"),
    ("not_an_image", llava("bad", image="text.png"), "image_not_an_image", "text.png"),
    ("image_is_folder", llava("bad", image="folder.png"), "image_not_an_image", "not a regular file"),
    ("corrupt_png", llava("bad", image="truncated.png"), "image_corrupt", "truncated.png"),
    ("decompression_bomb", llava("bad", image="bomb.png"), "image_too_large", "bomb.png"),
    ("one_pixel", llava("bad", image="dot.png"), "image_too_small", "1x1"),
    ("extreme_aspect", llava("bad", image="wide.png"), "image_extreme_aspect_ratio", "400x8"),
    # text no library should see: lone surrogates (json decodes "\\ud800" happily), control characters
    ("lone_surrogate", llava("bad", question="what is \ud800 this?"), "invalid_text", "turn 0: '\\ud800'"),
    ("surrogate_in_answer", llava("bad", answer="red \udfff"), "invalid_text", "surrogate"),
    ("surrogate_in_image_path", llava("bad", image="go\ud83dod.png"), "invalid_text", "image path"),
    ("nul_in_question", llava("bad", question="a\x00b"), "control_characters", "turn 0: '\\x00' at character 1"),
    ("esc_in_answer", llava("bad", answer="\x1b[31mred"), "control_characters", "turn 1: '\\x1b'"),
    ("bel_in_question", llava("bad", question="ding\x07"), "control_characters", "'\\x07'"),
    ("nul_in_image_path", llava("bad", image="good\x00.png"), "control_characters", "image path"),
    # only images are supported: other modalities are named, never dropped silently
    ("videos_field", llava("bad", question="<video>What happens?", videos=["clip.mp4"]), "unsupported_modality",
     "'videos' field"),
    ("video_placeholder", llava("bad", question="<video>What happens?"), "unsupported_modality", "turn 0: <video>"),
    ("audios_field", llava("bad", audios=["a.wav"]), "unsupported_modality", "'audios' field"),
]


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    make_image(root / "good.png")
    make_image(root / "dot.png", (1, 1))
    make_image(root / "wide.png", (400, 8))
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is not an image")
    (root / "folder.png").mkdir()
    make_truncated(root / "truncated.png")
    make_bomb_png(root / "bomb.png")
    return root


def _source(tmp_path, records, image_root=None, name="data.json"):
    path = write_json(tmp_path / name, records)
    source = {"path": path, "format": "llava"}
    if image_root is not None:
        source["image_root"] = str(image_root)
    return path, source


@pytest.mark.parametrize("case,bad,reason,detail", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_bad_record_raises_with_file_record_id_reason(tmp_path, image_root, case, bad, reason, detail):
    path, source = _source(tmp_path, [llava("ok-0", image="good.png"), bad, llava("ok-2")], image_root)
    with pytest.raises(DataError) as info:
        build(config([source], on_error="raise"))
    error, message = info.value, str(info.value)
    assert error.reason == reason and error.index == 1 and error.file == path
    assert path in message and "record 1" in message and reason in message and detail in message
    if isinstance(bad, dict) and isinstance(bad.get("id"), str):
        assert "id 'bad'" in message


@pytest.mark.parametrize("case,bad,reason,detail", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_bad_record_is_counted_under_skip(tmp_path, image_root, case, bad, reason, detail):
    _, source = _source(tmp_path, [llava("ok-0", image="good.png"), bad, llava("ok-2")], image_root)
    mixture = build(config([source], on_error="skip"))
    report = mixture.reports[0]
    assert report.records == 3 and report.kept == 2
    assert dict(report.skipped) == {reason: 1}
    assert report.examples[reason][0]["index"] == 1
    assert sorted(r["id"] for r in rows(mixture)) == ["ok-0", "ok-2"]
    assert reason in REASONS


def test_duplicate_id_keeps_the_first(tmp_path, image_root):
    path, source = _source(tmp_path, [llava("a", answer="first"), llava("b"), llava("a", answer="second")])
    with pytest.raises(DataError, match=r"record 2, id 'a': duplicate_id: first used by record 0"):
        build(config([source]))
    mixture = build(config([source], on_error="skip"))
    assert mixture.reports[0].skipped == {"duplicate_id": 1}
    assert {r["id"] for r in rows(mixture)} == {"a", "b"}


def test_missing_image_root(tmp_path):
    _, source = _source(tmp_path, [llava("a", image="x.png")])
    with pytest.raises(DataError, match="no_image_root"):
        build(config([source]))


def test_jsonl_bad_lines_report_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [llava("a"), b"", b'{"id": "b", "conversations": [', llava("c"),
                                              b'{"id": "d\xff\xfe", "conversations": []}', llava("e")])
    with pytest.raises(DataError) as info:
        build(config([{"path": path}]))
    assert info.value.reason == "invalid_json" and info.value.line == 3 and info.value.index == 1
    assert "line 3" in str(info.value)
    mixture = build(config([{"path": path}], on_error="skip", shuffle=False))
    report = mixture.reports[0]
    assert report.skipped == {"invalid_json": 1, "invalid_utf8": 1}
    assert report.examples["invalid_utf8"][0]["line"] == 5
    assert [r["id"] for r in rows(mixture)] == ["a", "c", "e"]


@pytest.mark.parametrize("content,reason,line", [(b'[{"id": "a"},\n {"id": "b",,}]', "invalid_json", 2),
                                                 (b'[{"id": "a"},\n\n {"id": "b\xc3\x28"}]', "invalid_utf8", 3),
                                                 (b'[{"id": "a"}] [x]', "invalid_json", 1)])
def test_json_file_errors_stop_even_under_skip(tmp_path, content, reason, line):
    path = tmp_path / "d.json"
    path.write_bytes(content)
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError) as info:
            build(config([{"path": str(path)}], on_error=on_error))
        assert info.value.reason == reason and info.value.line == line and f"line {line}" in str(info.value)


def test_json_array_that_is_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('"just a string"')
    with pytest.raises(DataError, match="expected a JSON array"):
        build(config([{"path": str(path)}]))


def test_missing_source_file(tmp_path):
    with pytest.raises(DataError, match="file_missing"):
        build(config([{"path": str(tmp_path / "nope.json")}]))


def test_image_without_placeholder_is_prepended_and_noted(tmp_path, image_root):
    _, source = _source(tmp_path, [llava("a", question="What is it?", image="good.png"),
                                   llava("b", question="Compare.", images=["good.png", "good.png"])], image_root)
    mixture = build(config([source], shuffle=False))
    assert mixture.reports[0].notes == {"image_placeholder_prepended": 2}
    a, b = rows(mixture)
    assert a["input_ids"].count(IMAGE_PLACEHOLDER_ID) == 1 and b["input_ids"].count(IMAGE_PLACEHOLDER_ID) == 2
    # ChatML: "<|im_start|>user\n", the placeholder, then "\n" and the question
    tok, first = tokenizer(), a["input_ids"].index(IMAGE_PLACEHOLDER_ID)
    assert tok.decode(a["input_ids"][:first]) == "<|im_start|>user\n"
    assert tok.decode(a["input_ids"][first + 1:]).startswith("\nWhat is it?<|im_end|>")
    assert b["images"] == [os.path.join(str(image_root), "good.png")] * 2


def test_formats_alpaca_and_messages(tmp_path, image_root):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "output": "Hi.", "system": "Be brief."},
        {"instruction": "No answer."},
        {"instruction": 3, "output": "x"},
    ])
    messages = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "m0", "images": ["good.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "Red."}]},
        {"id": "m1", "messages": [{"role": "user", "content": {"text": "x"}}, {"role": "assistant", "content": "y"}]},
        {"id": "m2", "messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "y"}]},
    ])
    cfg = config([{"path": alpaca, "format": "auto"}, {"path": messages, "image_root": str(image_root)}], on_error="skip")
    mixture = build(cfg)
    a, m = mixture.reports
    assert (a.kept, dict(a.skipped)) == (2, {"missing_field": 1, "non_string_value": 1})
    assert (m.kept, dict(m.skipped)) == (1, {"non_string_value": 1, "malformed_conversations": 1})
    texts = {r["id"]: r for r in rows(mixture)}
    tok = tokenizer()
    assert "Add.\n2 and 3" in tok.decode([t for t in texts["#0"]["input_ids"] if t >= 0])
    assert "<|im_start|>system\nBe brief.<|im_end|>" in tok.decode(texts["#1"]["input_ids"])
    assert texts["m0"]["input_ids"].count(IMAGE_PLACEHOLDER_ID) == 1


def test_read_only_first_max_samples(tmp_path):
    path = write_json(tmp_path / "d.json", [llava(f"r{i}") for i in range(10)] + [["bad"]])
    mixture = build(config([{"path": path, "max_samples": 4}], shuffle=False))
    assert mixture.reports[0].records == 4 and [r["id"] for r in rows(mixture)] == ["r0", "r1", "r2", "r3"]


def test_integer_ids_and_missing_ids(tmp_path):
    records = [llava(7), {"conversations": llava()["conversations"]}]
    mixture = build(config([{"path": write_json(tmp_path / "d.json", records)}], shuffle=False))
    assert [r["id"] for r in rows(mixture)] == ["7", "#1"]


def test_bad_records_do_not_hide_each_other(tmp_path, image_root):
    """All the cases in one file, each under its own id: each is counted under its own reason."""
    records = []
    for i, (_, bad, _, _) in enumerate(RECORD_CASES):
        records.append(dict(bad, id=f"bad-{i}") if isinstance(bad, dict) and bad.get("id") == "bad" else bad)
    _, source = _source(tmp_path, records + [llava("good", image="good.png")], image_root)
    report = build(config([source], on_error="skip")).reports[0]
    assert report.kept == 1 and report.records == len(RECORD_CASES) + 1
    assert report.skipped == Counter(reason for _, _, reason, _ in RECORD_CASES)


def test_tab_newline_and_carriage_return_are_kept(tmp_path):
    _, source = _source(tmp_path, [llava("a", question="col1\tcol2\r\nnext", answer="x\ny")])
    assert [r["id"] for r in rows(build(config([source])))] == ["a"]


def test_id_with_a_lone_surrogate(tmp_path):
    path, source = _source(tmp_path, [llava("ok-0"), llava("b\ud800d"), llava("ok-2")])
    with pytest.raises(DataError) as info:
        build(config([source]))
    assert (info.value.reason, info.value.index, info.value.file) == ("invalid_text", 1, path)
    assert "id: '\\ud800'" in str(info.value)
    mixture = build(config([source], on_error="skip"))
    assert mixture.reports[0].skipped == {"invalid_text": 1}
    assert sorted(r["id"] for r in rows(mixture)) == ["ok-0", "ok-2"]


class _PickyTokenizer:
    """The test tokenizer, failing (as a fast tokenizer does on a lone surrogate) on any text
    holding `kaboom`; counts its batched calls."""

    def __init__(self):
        self._inner, self.batched_calls = tokenizer(), 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, text, **kwargs):
        texts = [text] if isinstance(text, str) else text
        if len(texts) > 1:
            self.batched_calls += 1
        if any("kaboom" in t for t in texts):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return self._inner(text, **kwargs)


def test_a_text_the_tokenizer_rejects_fails_only_its_record(tmp_path):
    """The batch call fails; each record is then tokenised alone: the bad one is `invalid_text`,
    its neighbours in the same batch load, and clean batches stay one call."""
    path, source = _source(tmp_path, [llava("ok-0"), llava("bad", question="kaboom?"), llava("ok-2")])
    with pytest.raises(DataError) as info:
        build_mixture(config([source]), _PickyTokenizer(), use_cache=False)
    error = info.value
    assert (error.reason, error.index, error.file, error.record_id) == ("invalid_text", 1, path, "bad")
    assert "record 1" in str(error) and "TypeError" in str(error)
    mixture = build_mixture(config([source], on_error="skip"), _PickyTokenizer(), use_cache=False)
    assert mixture.reports[0].skipped == {"invalid_text": 1}
    assert mixture.reports[0].examples["invalid_text"][0]["index"] == 1
    assert sorted(r["id"] for r in rows(mixture)) == ["ok-0", "ok-2"]
    clean = _PickyTokenizer()
    _, good = _source(tmp_path, [llava(f"g{i}") for i in range(5)], name="good.json")
    assert build_mixture(config([good]), clean, use_cache=False).reports[0].kept == 5
    assert clean.batched_calls == 1


def test_a_row_pyarrow_cannot_store_fails_only_its_record(tmp_path, monkeypatch):
    """pyarrow gets whole batches; a batch it refuses is written row by row, and only the row it
    cannot store is `unstorable_record` (its neighbours in the same batch are kept)."""
    import pyarrow as pa

    from mm_teamlora.data import prepare

    real = pa.RecordBatch.from_pydict

    class PickyBatch:
        @staticmethod
        def from_pydict(rows, schema=None):
            if "b" in rows["id"]:
                raise pa.ArrowInvalid("Could not convert 'b' with type str: tried to convert to int64")
            return real(rows, schema=schema)

    monkeypatch.setattr(prepare.pa, "RecordBatch", PickyBatch)
    path, source = _source(tmp_path, [llava("a"), llava("b"), llava("c")])
    with pytest.raises(DataError) as info:
        build(config([source]))
    assert (info.value.reason, info.value.index, info.value.file) == ("unstorable_record", 1, path)
    assert "ArrowInvalid" in str(info.value)
    mixture = build(config([source], on_error="skip", shuffle=False))
    assert mixture.reports[0].skipped == {"unstorable_record": 1}
    assert [r["id"] for r in rows(mixture)] == ["a", "c"]


def test_a_jsonl_line_json_cannot_parse_fails_only_its_record(tmp_path):
    """json raises RecursionError on deep nesting and ValueError past Python's integer digit
    limit, not JSONDecodeError: both are `invalid_json` for that line alone."""
    deep, big = b"[" * 100_000 + b"]" * 100_000, b'{"id": ' + b"9" * 5000 + b"}"
    path = write_jsonl(tmp_path / "d.jsonl", [llava("a"), deep, llava("c"), big, llava("e")])
    with pytest.raises(DataError) as info:
        build(config([{"path": path}]))
    assert (info.value.reason, info.value.line, info.value.index) == ("invalid_json", 2, 1)
    assert "RecursionError" in str(info.value)
    mixture = build(config([{"path": path}], on_error="skip", shuffle=False))
    assert mixture.reports[0].skipped == {"invalid_json": 2}
    assert [e["line"] for e in mixture.reports[0].examples["invalid_json"]] == [2, 4]
    assert [r["id"] for r in rows(mixture)] == ["a", "c", "e"]
    array = tmp_path / "deep.json"
    array.write_bytes(b"[" + deep + b"]")
    with pytest.raises(DataError, match="invalid_json: RecursionError"):
        build(config([{"path": str(array)}], on_error="skip"))


def test_a_pil_error_other_than_oserror_fails_only_its_image(tmp_path, image_root, monkeypatch):
    """PIL plugins raise ValueError, struct.error, ... on odd header bytes: `image_corrupt` for
    the records of that image, the others load."""
    import struct

    from PIL import Image

    real_open = Image.open

    def picky_open(path, *args, **kwargs):
        if str(path).endswith("odd.png"):
            raise struct.error("unpack requires a buffer of 4 bytes")
        return real_open(path, *args, **kwargs)

    make_image(image_root / "odd.png")
    monkeypatch.setattr(Image, "open", picky_open)
    path, source = _source(tmp_path, [llava("ok-0", image="good.png"), llava("bad", image="odd.png"),
                                      llava("ok-2", image="good.png")], image_root)
    with pytest.raises(DataError) as info:
        build(config([source]))
    assert (info.value.reason, info.value.index, info.value.record_id) == ("image_corrupt", 1, "bad")
    assert "odd.png: error: unpack requires" in str(info.value)
    mixture = build(config([source], on_error="skip"))
    assert mixture.reports[0].skipped == {"image_corrupt": 1}
    assert sorted(r["id"] for r in rows(mixture)) == ["ok-0", "ok-2"]
