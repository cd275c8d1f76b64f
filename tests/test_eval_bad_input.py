"""A malformed MMBench TSV under `on_error: skip`: the eval report says how many rows were skipped
and why, and `rejected.jsonl` beside it lists every one (file, row, line, index, reason, detail)."""

import json

import pytest

from fixtures.eval.helpers import MALFORMED_TSV, question, write_tsv
from mm_teamlora.cli import main
from mm_teamlora.eval.runner import EvalConfig, evaluate, rescore
from mm_teamlora.model import load_model

# (row, line, index cell, reason) of every bad row of the malformed fixture, in file order
EXPECTED = [(1, 3, "11", "answer_not_an_option"), (2, 4, "12", "too_few_options"),
            (3, 5, "13", "image_not_decodable"), (4, 6, "14", "image_reference_missing"),
            (5, 7, "10", "duplicate_index"), (6, 8, "15", "missing_question"), (7, 9, "16", "option_gap"),
            (8, 10, "sixteen", "bad_index")]


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-random")


def _rejected(folder):
    return [json.loads(line) for line in (folder / "rejected.jsonl").read_text().splitlines()]


def test_eval_under_skip_lists_every_skipped_row_and_reports_the_counts(model, tmp_path):
    result = evaluate(model, MALFORMED_TSV, str(tmp_path), EvalConfig(on_error="skip"), progress=False)
    rejected = _rejected(tmp_path)
    assert [(r["index"], r["line"], r["id"], r["reason"]) for r in rejected] == EXPECTED
    assert all(r["file"] == MALFORMED_TSV and r["source"] == "mmbench" and r["detail"] for r in rejected)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == result.report
    assert report["rows_read"] == 10 and report["questions"] == 2 and report["rows_read"] == 2 + len(rejected)
    assert report["skipped_rows"] == {reason: 1 for *_, reason in EXPECTED}
    assert report["rejected"] == "rejected.jsonl" and report["on_error"] == "skip"
    md = (tmp_path / "report.md").read_text()
    assert "rows read: 10; skipped: 8 (" in md and "option_gap 1" in md and "rejected.jsonl" in md
    assert "questions kept: 2" in md and "text-only questions (an empty image cell" in md


def test_report_md_states_the_text_only_count_and_a_clean_file_writes_an_empty_list(model, tmp_path):
    path = write_tsv(tmp_path / "mixed.tsv", [question(1), question(2, image=""), question(3, image="")])
    evaluate(model, path, str(tmp_path / "out"), EvalConfig(), progress=False)
    assert (tmp_path / "out" / "rejected.jsonl").read_text() == ""
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["text_only_questions"] == 2 and report["skipped_rows"] == {}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "text-only questions (an empty image cell, asked without a picture): 2" in md
    assert "rows read: 3; skipped: 0; questions kept: 3" in md


def test_rescore_and_the_eval_command_list_skipped_rows_too(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--model", "tiny-random", "--data", MALFORMED_TSV, "--on-error", "skip",
                 "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 8 of 10 rows (" in printed and str(out / "rejected.jsonl") in printed
    assert len(_rejected(out)) == 8
    score_dir = tmp_path / "score"
    report = rescore([str(out / "predictions.tsv")], MALFORMED_TSV, str(score_dir), on_error="skip")
    assert report["skipped_rows"] == {reason: 1 for *_, reason in EXPECTED}
    assert _rejected(score_dir) == _rejected(out)
    assert "skipped: 8" in (score_dir / "report.md").read_text()


def test_inspect_routing_under_skip_lists_the_skipped_rows(tmp_path):
    from fixtures.eval.helpers import routed_tiny_model
    from mm_teamlora.eval.routing import inspect_routing

    result = inspect_routing(routed_tiny_model(), MALFORMED_TSV, str(tmp_path), on_error="skip", plots=False)
    assert result["skipped"] == {reason: 1 for *_, reason in EXPECTED}
    assert [(r["index"], r["reason"]) for r in _rejected(tmp_path)] == [(i, reason) for i, _, _, reason in EXPECTED]
