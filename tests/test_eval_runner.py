"""Running the tiny model over MMBench files: likelihood and generate modes, batching, picture
reuse, resume, shards, and the `eval` / `eval-score` commands."""

import csv
import json

import pytest
import torch

from fixtures.eval.helpers import MALFORMED_TSV, SMALL_TSV
from mm_teamlora.data.templates import ConversationTemplate
from mm_teamlora.cli import _shard_from_env, main
from mm_teamlora.eval import runner
from mm_teamlora.eval.answers import letter_token_ids
from mm_teamlora.eval.mmbench import encode_question, read_mmbench
from mm_teamlora.eval.runner import EvalConfig, evaluate, rescore
from mm_teamlora.model import load_model


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-random")


def log_records(path):
    lines = open(path).read().splitlines()
    return json.loads(lines[0])["meta"], {r["index"]: r for r in map(json.loads, lines[1:])}


def test_likelihood_run_matches_one_by_one_scoring_and_encodes_each_picture_once(model, tmp_path):
    result = evaluate(model, SMALL_TSV, str(tmp_path), EvalConfig(circular=True, batch_size=4), progress=False)
    assert result.rows == 13 and result.rows_run == 13  # 4 + 2 + 3 + 2 + 2 rotations
    assert result.images_encoded == 3  # three distinct pictures serve 13 rows
    _, records = log_records(result.log)
    data = read_mmbench(SMALL_TSV)
    template = ConversationTemplate("chat", model.tokenizer)
    ids = letter_token_ids(template, "ABCD")
    with torch.no_grad():
        for q in data.asked(circular=True):
            prompt = torch.tensor([encode_question(q, template)])
            pixels = model.vision_tower.preprocess(data.image(q.image_key))[None]
            logits = model(prompt, pixel_values=pixels, image_counts=torch.tensor([1])).logits[0, -1]
            expected = logits.log_softmax(-1)[[ids[c] for c in q.letters]]
            got = torch.tensor([records[q.index]["scores"][c] for c in q.letters])
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            assert records[q.index]["prediction"] == q.letters[int(expected.argmax())]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["overall"]["n"] == 5 and report["unparsed"] == 0 and report["missing"] == 0
    assert report["overall"]["circular"] is not None and report["overall"]["chance"] == pytest.approx(
        (1 / 4 + 1 / 2 + 1 / 3 + 1 / 2 + 1 / 2) / 5)
    vanilla = sum(records[q.index]["prediction"] == q.answer for q in data.questions) / 5
    assert report["overall"]["vanilla"] == pytest.approx(vanilla)
    rows = list(csv.DictReader(open(result.predictions), delimiter="\t"))
    assert len(rows) == 13 and rows[0].keys() >= {"index", "question", "A", "B", "answer", "category",
                                                  "l2-category", "split", "prediction"}


def test_an_interrupted_run_resumes_without_repeating_finished_rows(model, tmp_path, monkeypatch):
    config = EvalConfig(circular=True, batch_size=4)
    full = evaluate(model, SMALL_TSV, str(tmp_path / "full"), config, progress=False)
    calls = []
    real = runner.score_letters

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "score_letters", failing)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, SMALL_TSV, str(tmp_path / "cut"), config, progress=False)
    log = tmp_path / "cut" / "predictions.jsonl"
    assert len(log_records(log)[1]) == 8  # two batches of 4 were written before the interruption
    with open(log, "a") as f:
        f.write('{"index": 99, "predic')  # a line cut mid-write
    monkeypatch.setattr(runner, "score_letters", real)
    resumed = evaluate(model, SMALL_TSV, str(tmp_path / "cut"), config, progress=False)
    assert resumed.rows_run == 5 and resumed.report["overall"] == full.report["overall"]
    assert open(resumed.predictions).read() == open(full.predictions).read()
    again = evaluate(model, SMALL_TSV, str(tmp_path / "cut"), config, progress=False)
    assert again.rows_run == 0 and again.images_encoded == 0
    with pytest.raises(ValueError, match="other settings"):
        evaluate(model, SMALL_TSV, str(tmp_path / "cut"), EvalConfig(circular=False), progress=False)
    assert evaluate(model, SMALL_TSV, str(tmp_path / "cut"), EvalConfig(), restart=True, progress=False).rows_run == 5


def test_shards_split_questions_and_their_merge_rescores_to_the_full_report(model, tmp_path):
    full = evaluate(model, SMALL_TSV, str(tmp_path / "full"), EvalConfig(circular=True), progress=False)
    shard_files, seen = [], []
    for k in range(2):
        part = evaluate(model, SMALL_TSV, str(tmp_path / "shards"), EvalConfig(circular=True, shard=k, num_shards=2),
                        progress=False)
        assert part.report is None and part.predictions.endswith(f"shard-{k}-of-2.tsv")
        indices = [int(r["index"]) for r in csv.DictReader(open(part.predictions), delimiter="\t")]
        assert all(i % 1_000_000 % 2 == k for i in indices)  # every rotation of a question in one shard
        shard_files.append(part.predictions)
        seen += indices
    assert sorted(seen) == sorted(int(r["index"]) for r in csv.DictReader(open(full.predictions), delimiter="\t"))
    merged = rescore(shard_files, SMALL_TSV, str(tmp_path / "merged"))
    assert merged["overall"] == full.report["overall"] and merged["by_category"] == full.report["by_category"]


def test_generate_mode_extracts_letters_and_counts_unparsed(model, tmp_path, monkeypatch):
    real = evaluate(model, SMALL_TSV, str(tmp_path / "real"), EvalConfig(mode="generate", max_new_tokens=4),
                    progress=False)
    _, records = log_records(real.log)
    assert real.report["unparsed"] == sum(r["prediction"] is None for r in records.values())
    assert all(isinstance(r["output"], str) for r in records.values())
    answers = iter(["The answer is A.", "B", "I am not sure.", "(A) yes", "the circle"])
    monkeypatch.setattr(runner, "generate_texts", lambda m, prompts, f, n: [next(answers) for _ in prompts])
    fake = evaluate(model, SMALL_TSV, str(tmp_path / "fake"), EvalConfig(mode="generate", batch_size=2),
                    progress=False)
    assert fake.report["unparsed"] == 1 and fake.report["overall"]["vanilla"] == pytest.approx(4 / 5)
    rows = list(csv.DictReader(open(fake.predictions), delimiter="\t"))
    assert [r["prediction"] for r in rows] == ["A", "B", "I am not sure.", "A", "B"]  # raw text kept when unparsed
    assert rescore([fake.predictions], SMALL_TSV, str(tmp_path / "re"))["overall"] == fake.report["overall"]


def test_eval_commands_return_exit_codes(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model", "tiny-random", "--data", SMALL_TSV, "--mode", "likelihood",
                 "--circular", "--out", str(out), "--device", "cpu"])
    assert code == 0 and {"predictions.tsv", "report.json", "report.md"} <= {p.name for p in out.iterdir()}
    assert "circular" in capsys.readouterr().out
    code = main(["eval-score", "--predictions", str(out / "predictions.tsv"), "--data", SMALL_TSV,
                 "--out", str(tmp_path / "score")])
    assert code == 0
    assert json.loads((tmp_path / "score" / "report.json").read_text())["overall"] == \
        json.loads((out / "report.json").read_text())["overall"]
    assert main(["eval", "--data", SMALL_TSV]) == 2  # no model
    assert main(["eval", "--model", "tiny-random", "--data", MALFORMED_TSV,
                 "--out", str(tmp_path / "bad")]) == 1
    assert main(["eval", "--model", "tiny-random", "--data", SMALL_TSV, "--mode", "guess",
                 "--out", str(tmp_path / "x")]) == 2
    assert "answer_not_an_option" in capsys.readouterr().err


def test_scores_are_the_same_without_logits_to_keep(model, monkeypatch):
    data = read_mmbench(SMALL_TSV)
    template = ConversationTemplate("chat", model.tokenizer)
    prompts = [encode_question(q, template) for q in data.questions]
    cache = runner.ImageFeatureCache(model, data)
    features = cache.features([q.image_key for q in data.questions])
    ids = list(letter_token_ids(template, "AB").values())
    kept = runner.score_letters(model, prompts, features, ids)
    lm = model.language_model
    plain = lm.forward
    monkeypatch.setattr(lm, "forward", lambda *a, **k: plain(*a, **k))  # a signature without logits_to_keep
    torch.testing.assert_close(runner.score_letters(model, prompts, features, ids), kept, atol=1e-5, rtol=1e-5)
    assert cache.computed == 3


def test_resume_is_refused_when_the_data_file_changed(model, tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text(open(SMALL_TSV).read())
    evaluate(model, str(path), str(tmp_path / "out"), EvalConfig(), progress=False)
    path.write_text(open(SMALL_TSV).read().replace("What shape is shown?", "Which shape is shown?"))
    with pytest.raises(ValueError, match="other settings"):
        evaluate(model, str(path), str(tmp_path / "out"), EvalConfig(), progress=False)


def test_a_log_cut_inside_its_first_line_starts_afresh_and_shards_can_come_from_the_launcher(model, tmp_path,
                                                                                             monkeypatch):
    (tmp_path / "predictions.jsonl").write_text('{"meta": {"format": "mm_te')
    assert evaluate(model, SMALL_TSV, str(tmp_path), EvalConfig(), progress=False).rows_run == 5
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert _shard_from_env(0, 0) == (1, 3) and _shard_from_env(2, 4) == (2, 4)


def test_limit_asks_the_first_questions_with_all_their_rotations(model, tmp_path):
    full = evaluate(model, SMALL_TSV, str(tmp_path / "full"), EvalConfig(circular=True), progress=False)
    part = evaluate(model, SMALL_TSV, str(tmp_path / "part"), EvalConfig(circular=True, limit=2), progress=False)
    assert part.rows == 6 and part.report["overall"]["n"] == 2  # 4 + 2 rotations of the two lowest indices
    _, whole = log_records(full.log)
    meta, some = log_records(part.log)
    assert meta["limit"] == 2 and {i: r["prediction"] for i, r in some.items()} == \
        {i: whole[i]["prediction"] for i in some}
    with pytest.raises(ValueError, match="limit"):
        EvalConfig(limit=-1).validate()
