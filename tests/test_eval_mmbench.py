"""MMBench TSV reading: layout, index-referenced pictures, malformed rows, rotations, prompts."""

import pytest

from fixtures.eval.helpers import MALFORMED_TSV, SMALL_TSV, png_b64, question, write_tsv
from mm_teamlora.data.errors import DataError
from mm_teamlora.eval.mmbench import PromptConfig, prompt_text, read_mmbench


def test_reads_the_official_layout_with_index_referenced_pictures():
    data = read_mmbench(SMALL_TSV)
    assert [q.index for q in data.questions] == [0, 1, 2, 3, 4]
    q0, q1, q2, q3, q4 = data.questions
    assert q0.options == ("red", "blue", "green", "yellow") and q0.answer == "A" and q0.hint is None  # 'nan' hint
    assert q1.options == ("square", "circle") and q1.hint == "The shape is drawn on white."
    assert q3.options == ("yes", "no")  # 'nan' option cells mean fewer options
    assert (q0.category, q0.l2_category, q0.split) == ("color_recognition", "attribute_perception", "dev")
    # rows 2 and 4 hold "0" and "1": they reuse the pictures of rows 0 and 1
    assert (q2.image_key, q4.image_key) == (0, 1)
    assert sorted(data.images) == [0, 1, 3]
    assert data.image(q2.image_key).tobytes() == data.image(0).tobytes()
    assert data.image(0).mode == "RGB" and data.image(0).getpixel((8, 8)) == (255, 0, 0)
    assert data.image(1).getpixel((8, 8)) == (0, 0, 255)
    assert not data.has_rotated_copies and data.report.records == data.report.kept == 5


def test_malformed_rows_are_reported_with_row_and_reason_or_counted_under_skip():
    data = read_mmbench(MALFORMED_TSV, on_error="skip")
    assert [q.index for q in data.questions] == [10, 17]
    assert data.questions[1].image_key == 10  # a good row referencing a good row
    assert dict(data.report.skipped) == {
        "answer_not_an_option": 1, "too_few_options": 1, "image_not_decodable": 1, "image_reference_missing": 1,
        "duplicate_index": 1, "missing_question": 1, "option_gap": 1, "bad_index": 1}
    example = data.report.examples["image_reference_missing"][0]
    assert (example["index"], example["line"], example["id"]) == (4, 6, "14") and "99" in example["detail"]
    with pytest.raises(DataError) as err:
        read_mmbench(MALFORMED_TSV)
    assert err.value.reason == "answer_not_an_option" and err.value.line == 3 and err.value.record_id == "11"
    assert "mmbench_malformed.tsv" in str(err.value)


def test_reference_chains_loops_and_text_only_rows(tmp_path):
    rows = [question(1), question(2, image="1"), question(3, image="2"),  # 3 -> 2 -> 1
            question(4, image="5"), question(5, image="4"),  # a loop
            question(6, image="")]  # no picture: a text-only question
    data = read_mmbench(write_tsv(tmp_path / "chain.tsv", rows), on_error="skip")
    keys = {q.index: q.image_key for q in data.questions}
    assert keys == {1: 1, 2: 1, 3: 1, 6: None}
    assert data.report.skipped == {"image_reference_missing": 2}
    assert "<image>" not in prompt_text(data.questions[-1])


def test_missing_required_column_is_a_file_error(tmp_path):
    path = tmp_path / "nocol.tsv"
    path.write_text("index\tA\tB\n1\tx\ty\n")
    with pytest.raises(DataError, match="question"):
        read_mmbench(str(path), on_error="skip")


def test_rotation_moves_options_and_answer_and_single_copies_are_rotated_only_when_circular(tmp_path):
    data = read_mmbench(write_tsv(tmp_path / "one.tsv", [question(7, n=3, answer="B"), question(8, n=2)]))
    assert [q.index for q in data.asked(circular=False)] == [7, 8]
    asked = data.asked(circular=True)
    assert [q.index for q in asked] == [7, 1_000_007, 2_000_007, 8, 1_000_008]
    r1 = asked[1]
    assert r1.options == ("opt1", "opt2", "opt0") and r1.answer == "A"  # opt1 (the answer) is now under A
    assert asked[2].options == ("opt2", "opt0", "opt1") and asked[2].answer == "C"
    for q in asked:
        assert q.options[q.letters.index(q.answer)] == ("opt1" if q.group == 7 else "opt0")
        assert q.image_key == q.group  # every rotation reuses the picture of its question


def test_files_with_rotated_copies_are_grouped_not_rotated_again(tmp_path):
    base = question(3, n=2, answer="A")
    copy = question(1_000_003, n=2, answer="B", image="3", A="opt1", B="opt0")
    data = read_mmbench(write_tsv(tmp_path / "circ.tsv", [base, question(4, n=2), copy]))
    assert data.has_rotated_copies
    assert [q.index for q in data.asked(circular=True)] == [3, 1_000_003, 4]
    assert [q.index for q in data.asked(circular=False)] == [3, 4]
    assert data.asked(circular=True)[1].options == ("opt1", "opt0")


def test_prompt_follows_llava_mmbench_and_is_configurable():
    data = read_mmbench(SMALL_TSV)
    text = prompt_text(data.questions[1])
    assert text == ("<image>\nThe shape is drawn on white.\nWhat shape is shown?\nA. square\nB. circle\n"
                    "Answer with the option's letter from the given choices directly.")
    custom = prompt_text(data.questions[1], PromptConfig(instruction="Letter only.", use_hint=False, image_first=False))
    assert custom == "What shape is shown?\nA. square\nB. circle\n<image>\nLetter only."


def test_undecodable_picture_referenced_by_another_row_fails_both(tmp_path):
    rows = [question(1, image="aGVsbG8gd29ybGQ="), question(2, image="1"), question(3, image=png_b64("blue"))]
    data = read_mmbench(write_tsv(tmp_path / "bad.tsv", rows), on_error="skip")
    assert [q.index for q in data.questions] == [3]
    assert data.report.skipped == {"image_not_decodable": 2}


def test_a_dev_row_without_answer_is_rejected_and_a_test_row_is_unlabelled(tmp_path):
    rows = [question(1), question(2, answer=""), question(3, answer="nan"),  # dev rows: answers required
            question(4, answer="", split="test"), question(5, answer="", split=""), question(6)]
    path = write_tsv(tmp_path / "answers.tsv", rows)
    with pytest.raises(DataError) as err:
        read_mmbench(path)
    assert (err.value.reason, err.value.index, err.value.line, err.value.record_id) == ("missing_answer", 1, 3, "2")
    assert "answers.tsv" in str(err.value) and "dev" in str(err.value)
    data = read_mmbench(path, on_error="skip")
    assert data.report.skipped == {"missing_answer": 2}
    assert [e["id"] for e in data.report.examples["missing_answer"]] == ["2", "3"]
    assert {q.index: q.answer for q in data.questions} == {1: "A", 4: None, 5: None, 6: "A"}
    assert data.report.records == len(rows) and data.report.kept == 4


def test_an_empty_image_cell_is_a_text_only_question_and_counted(tmp_path):
    rows = [question(1), question(2, image=""), question(3, image="nan"), question(4)]
    data = read_mmbench(write_tsv(tmp_path / "text.tsv", rows))
    assert data.report.kept == 4 and not data.report.skipped
    assert data.text_only == 2 and [q.index for q in data.questions if q.image_key is None] == [2, 3]
    assert not prompt_text(data.questions[1]).startswith("<image>")
    assert prompt_text(data.questions[0]).startswith("<image>\n")
