import json
import os

import pytest

from fixtures.data.helpers import REPO, llava, make_image, write_json
from mm_teamlora.cli import main


def test_demo_command_refuses_bad_arguments_with_exit_2(tmp_path, capsys):
    # the recipe itself runs end to end in tests/test_demo.py (tiny model) and in .ci/run (the real one)
    assert main(["demo", "--method", "dora", "--out", str(tmp_path / "demo")]) == 2
    assert "--method must be one of teamlora, lora, moelora, hydralora" in capsys.readouterr().err
    assert main(["demo", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "demo")]) == 2


def test_unknown_command_and_bad_option_types_exit_with_usage():
    with pytest.raises(SystemExit):
        main(["nope"])
    with pytest.raises(SystemExit):
        main(["demo", "--minutes", "many"])


FIXTURE_MIX = os.path.join(REPO, "data_configs", "fixtures.yaml")


@pytest.fixture
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MM_TEAMLORA_CACHE", str(tmp_path / "cache"))


def test_data_check_passes_on_the_fixture_mixture_and_fails_on_a_bad_record(tmp_path, capsys, data_cache):
    assert main(["data", "check", FIXTURE_MIX, "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "mixture 'fixtures': per-source counts" in out and "first batch" in out
    report = json.load(open(tmp_path / "report" / "data_report.json"))
    assert {s["name"]: (s["records"], s["kept"], s["sampled"]) for s in report["sources"]} == \
        {"llava": (4, 4, 8), "alpaca": (3, 3, 3), "messages": (2, 2, 1)}
    assert main(["data", "check", FIXTURE_MIX]) == 0
    assert "hit" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x1", "conversations": [{"from": "gpt", "value": "hi"}]}) + "\n")
    (tmp_path / "mix.yaml").write_text(
        "name: bad\ntemplate: chat\ntokenizer: tiny\nmax_length: 64\nimage_token_count: 16\non_error: raise\n"
        "sources:\n  - name: bad\n    path: bad.jsonl\n    format: llava\n")
    assert main(["data", "check", str(tmp_path / "mix.yaml")]) == 1
    assert "x1" in capsys.readouterr().out


def _bad_mix(tmp_path, on_error):
    make_image(tmp_path / "ok.png")
    write_json(tmp_path / "d.json", [llava("fine", image="ok.png"), llava("broken", image="missing.png"),
                                     llava("also-fine")])
    (tmp_path / "mix.yaml").write_text(f"tokenizer: tiny\non_error: {on_error}\nimage_token_count: 16\n"
                                       "sources:\n  - path: d.json\n    image_root: .\n")
    return str(tmp_path / "mix.yaml")


def test_data_check_fails_under_raise(tmp_path, capsys, data_cache):
    code = main(["data", "check", _bad_mix(tmp_path, "raise"), "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 1
    assert "d.json: record 1, id 'broken': image_missing" in out and "missing.png" in out
    assert json.load(open(tmp_path / "run" / "data_report.json"))["error"]["reason"] == "image_missing"


def test_data_check_counts_under_skip(tmp_path, capsys, data_cache):
    code = main(["data", "check", _bad_mix(tmp_path, "skip"), "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0 and "skipped  d: image_missing: 1 (first: record 1, id 'broken')" in out
    report = json.load(open(tmp_path / "run" / "data_report.json"))
    assert report["sources"][0]["skipped"] == {"image_missing": 1} and report["total"] == 2


def test_data_check_config_errors(tmp_path, capsys, data_cache):
    (tmp_path / "mix.yaml").write_text("sources: [{path: d.json}]\n")
    assert main(["data", "check", str(tmp_path / "mix.yaml")]) == 2
    assert "no tokenizer; pass --model" in capsys.readouterr().out
    (tmp_path / "mix.yaml").write_text("tokenizer: tiny\nsources: [{path: d.json, weight: 0}]\n")
    assert main(["data", "check", str(tmp_path / "mix.yaml")]) == 2
    assert "weight must be positive" in capsys.readouterr().out
    (tmp_path / "mix.yaml").write_text("sources: [{path: d.json}]\n")
    assert main(["data", "check", str(tmp_path / "mix.yaml"), "--tokenizer", "tiny"]) == 1
    assert "file_missing" in capsys.readouterr().out
    assert main(["data", "check", FIXTURE_MIX, "--model", "no-such-model"]) == 2
    assert "neither a model folder" in capsys.readouterr().out


def test_data_check_fails_on_an_empty_mixture(tmp_path, capsys, data_cache):
    write_json(tmp_path / "d.json", [["not", "a", "record"]])
    (tmp_path / "mix.yaml").write_text("tokenizer: tiny\non_error: skip\nsources: [{path: d.json}]\n")
    assert main(["data", "check", str(tmp_path / "mix.yaml")]) == 1
    out = capsys.readouterr().out
    assert "skipped  d: not_an_object: 1 (first: record 0)" in out and "the mixture is empty" in out


def test_data_check_with_a_model_uses_its_tokenizer_processor_and_tokens_per_image(tmp_path, capsys, data_cache):
    """The tiny-random preset: 16 tokens per image, 32 px images. The fixture YAML names 16 too; a
    mixture naming another count fails, one naming none takes the model's."""
    assert main(["data", "check", FIXTURE_MIX, "--model", "tiny-random"]) == 0
    assert "first batch" in capsys.readouterr().out
    text = open(FIXTURE_MIX).read().replace("../tests/", os.path.join(REPO, "tests") + "/")
    (tmp_path / "other.yaml").write_text(text.replace("image_token_count: 16", "image_token_count: 576"))
    assert main(["data", "check", str(tmp_path / "other.yaml"), "--model", "tiny-random"]) == 2
    assert "says image_token_count: 576 but the model gives 16" in capsys.readouterr().out
    (tmp_path / "none.yaml").write_text(text.replace("image_token_count: 16", "").replace("tokenizer: tiny", ""))
    assert main(["data", "check", str(tmp_path / "none.yaml")]) == 2  # neither a tokenizer nor a model
    assert main(["data", "check", str(tmp_path / "none.yaml"), "--model", "tiny-random"]) == 0
    assert main(["data", "check", str(tmp_path / "none.yaml"), "--model", "tiny-random", "--tokenizer", "tiny"]) == 2


def test_eval_rescore_and_inspect_routing_end_to_end(tmp_path):
    import pathlib

    from mm_teamlora.adapters import AdapterConfig
    from mm_teamlora.model import MultimodalConfig, MultimodalLM

    tsv = str(pathlib.Path(__file__).parent / "fixtures" / "eval" / "mmbench_small.tsv")
    model = MultimodalLM.from_config(MultimodalConfig.preset("tiny-random"))
    model.add_adapters(AdapterConfig(method="teamlora", r=8, num_experts=4, group_routing=True))
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", tsv, "--mode", "likelihood", "--circular",
                 "--out", str(out), "--batch-size", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"vanilla", "circular", "n", "chance"} <= set(report["overall"]) and "by_category" in report
    assert main(["eval-score", "--predictions", str(out / "predictions.tsv"), "--data", tsv,
                 "--out", str(tmp_path / "rescored")]) == 0
    rescored = json.loads((tmp_path / "rescored" / "report.json").read_text())
    assert rescored["overall"] == report["overall"]
    assert main(["inspect-routing", "--model", str(tmp_path / "model"), "--data", tsv,
                 "--out", str(tmp_path / "routing")]) == 0
    assert (tmp_path / "routing" / "routing.json").is_file()
    assert list((tmp_path / "routing").glob("*.png"))
