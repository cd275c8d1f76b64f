"""Vanilla and CircularEval scoring, chance levels, breakdowns, predictions files and rescoring."""

import csv
import json

import pytest

from fixtures.eval.helpers import question, write_tsv
from mm_teamlora.eval.mmbench import MMBenchQuestion, read_mmbench
from mm_teamlora.eval.runner import rescore
from mm_teamlora.eval.scoring import read_predictions, score


def q(index, n=4, answer="A", category="cat", split="dev", l2="l2"):
    return MMBenchQuestion(index=index, question="?", options=tuple(f"o{i}" for i in range(n)), answer=answer,
                           category=category, l2_category=l2, split=split, image_key=index)


def all_rotations(base):
    return [base.rotated(k) for k in range(len(base.options))]


def test_a_question_right_in_three_of_four_rotations_counts_wrong():
    asked = all_rotations(q(1)) + all_rotations(q(2))
    right = {r.index: r.answer for r in asked}
    wrong_last = dict(right)
    wrong_last[3_000_001] = "A" if asked[3].answer != "A" else "B"  # question 1, rotation 3 wrong
    report = score(asked, wrong_last)
    assert report["circular_eval"] is True
    assert report["overall"]["vanilla"] == 1.0  # rotation 0 is right for both
    assert report["overall"]["circular"] == 0.5  # question 1 fails one rotation of four
    assert score(asked, right)["overall"]["circular"] == 1.0
    assert score(asked, right)["incomplete_groups"] == 0
    assert score(asked[:3] + asked[4:], right)["incomplete_groups"] == 1  # question 1 lost a copy


def test_chance_levels_are_means_over_questions():
    asked = all_rotations(q(1, n=2)) + all_rotations(q(2, n=4))
    overall = score(asked, {})["overall"]
    assert overall["n"] == 2
    assert overall["chance"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert overall["chance_circular"] == pytest.approx(((1 / 2) ** 2 + (1 / 4) ** 4) / 2)
    assert overall["vanilla"] == 0.0 and overall["circular"] == 0.0


def test_missing_unparsed_unlabelled_and_breakdowns():
    asked = [q(1, category="color", split="dev"), q(2, category="color", split="test"),
             q(3, category="count", l2="fine", answer="B"), q(4, answer=None)]
    report = score(asked, {1: "A", 2: None, 3: "B", 4: "C"})
    assert report["circular_eval"] is False and report["overall"]["circular"] is None
    assert report["overall"]["n"] == 3 and report["overall"]["vanilla"] == pytest.approx(2 / 3)
    assert (report["unparsed"], report["missing"], report["unlabelled"]) == (1, 0, 1)
    assert report["by_category"]["color"]["vanilla"] == 0.5 and report["by_category"]["count"]["vanilla"] == 1.0
    assert set(report["by_split"]) == {"dev", "test"} and set(report["by_l2_category"]) == {"l2", "fine"}
    assert score(asked, {1: "A"})["missing"] == 3


def test_rescore_reads_a_predictions_tsv_reextracts_letters_and_infers_circular(tmp_path):
    data_path = write_tsv(tmp_path / "d.tsv", [question(1, n=2, answer="A"), question(2, n=3, answer="C")])
    preds = tmp_path / "p.tsv"
    with open(preds, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "prediction"])
        # question 1: right in both rotations (free text in one); question 2: right in 2 of 3
        w.writerows([[1, "A"], [1_000_001, "The answer is B"], [2, "C"], [1_000_002, "B"], [2_000_002, "C"]])
    report = rescore([str(preds)], data_path, str(tmp_path / "out"))
    assert report["circular_eval"] and report["overall"]["vanilla"] == 1.0 and report["overall"]["circular"] == 0.5
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["overall"] == report["overall"] and {"by_category", "by_l2_category", "unparsed"} <= set(on_disk)
    assert "| overall | 2 | 100.0 |" in (tmp_path / "out" / "report.md").read_text()
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.tsv"), delimiter="\t"))
    assert [r["prediction"] for r in rows] == ["A", "B", "C", "B", "C"]
    assert rows[1]["A"] == "opt1" and rows[1]["answer"] == "B"  # the rotated options, answer moved


def test_predictions_from_several_files_merge_and_conflicts_are_refused(tmp_path):
    a, b, c = tmp_path / "a.tsv", tmp_path / "b.jsonl", tmp_path / "c.tsv"
    a.write_text("index\tprediction\n1\tA\n")
    b.write_text(json.dumps({"meta": {}}) + "\n" + json.dumps({"index": 2, "prediction": None, "output": "B!"}) + "\n")
    c.write_text("index\tprediction\n1\tB\n")
    assert read_predictions([str(a), str(b)]) == {1: "A", 2: "B!"}
    with pytest.raises(ValueError, match="index 1"):
        read_predictions([str(a), str(c)])


def test_vanilla_rescoring_on_a_file_of_rotated_copies_uses_only_rotation_zero(tmp_path):
    rows = [question(1, n=2), question(1_000_001, n=2, answer="B", image="1")]
    data = read_mmbench(write_tsv(tmp_path / "c.tsv", rows))
    preds = tmp_path / "p.tsv"
    preds.write_text("index\tprediction\n1\tA\n")
    report = rescore([str(preds)], data, str(tmp_path / "out"))
    assert not report["circular_eval"] and report["overall"]["vanilla"] == 1.0 and report["missing"] == 0


def test_wilson_interval_known_values_and_reports_carry_it():
    from mm_teamlora.eval.scoring import wilson_interval

    # textbook values (Wilson 1927; Newcombe 1998 table I): 0/10 -> [0, 0.2775], 5/10 -> [0.2366, 0.7634]
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    asked = [q(1, answer="A"), q(2, answer="B")]
    report = score(asked, {1: "A", 2: "A"})
    assert report["overall"]["vanilla_ci95"] == pytest.approx(wilson_interval(1, 2))
    assert report["overall"]["circular_ci95"] is None  # not circular
