import pytest

from mm_teamlora.cli import main


def test_demo_runs_end_to_end_and_reloads_identically(tmp_path, capsys):
    assert main(["demo", "--steps", "4", "--out", str(tmp_path / "demo"), "--no-default-model"]) == 0
    out = capsys.readouterr().out
    assert "identical logits" in out and "JS" in out
    assert (tmp_path / "demo" / "adapter_model.safetensors").is_file()


def test_unknown_command_and_bad_option_types_exit_with_usage():
    with pytest.raises(SystemExit):
        main(["nope"])
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "many"])


def test_data_check_passes_on_the_fixture_mixture_and_fails_on_a_bad_record(tmp_path, capsys):
    import json
    import pathlib
    config = pathlib.Path(__file__).parent.parent / "data_configs" / "fixtures.yaml"
    assert main(["data", "check", str(config), "--out", str(tmp_path / "report")]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x1", "conversations": [{"from": "gpt", "value": "hi"}]}) + "\n")
    (tmp_path / "mix.yaml").write_text(
        "name: bad\ntemplate: chat\ntokenizer: tiny\nmax_length: 64\nimage_token_count: 16\non_error: raise\n"
        "sources:\n  - name: bad\n    path: bad.jsonl\n    format: llava\n")
    assert main(["data", "check", str(tmp_path / "mix.yaml")]) == 1
    assert "x1" in capsys.readouterr().out


def test_eval_rescore_and_inspect_routing_end_to_end(tmp_path):
    import json
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
