import pytest

from mm_teamlora.cli import main


def test_demo_runs_end_to_end_and_reloads_identically(tmp_path, capsys):
    assert main(["demo", "--steps", "4", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "identical logits" in out and "JS" in out
    assert (tmp_path / "demo" / "adapter_model.safetensors").is_file()


def test_unknown_command_and_bad_option_types_exit_with_usage():
    with pytest.raises(SystemExit):
        main(["nope"])
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "many"])
