"""The main job's recipe (`mm-teamlora demo`) end to end on the tiny model, in one process: the real
one (the embedded default, 2 CPU ranks) runs in `.ci/run` as a short `--minutes 1` job."""

import json
import os

import pytest
import yaml

from conftest import write_tiny_run
from mm_teamlora.demo import (BINDING_LR, BINDING_TARGET, DemoConfig, DemoResult, _binding_overrides, format_table,
                              passes_bar, run_demo)
from mm_teamlora.data.demo import build_demo_data
from mm_teamlora.model import MultimodalLM
from mm_teamlora.train import RunConfig
from test_data_demo import fake_assets


pytestmark = pytest.mark.usefixtures("own_cache")


def tiny_run(tmp_path, **optim) -> str:
    return write_tiny_run(tmp_path / "demo_tiny.yaml", optim=optim)


def test_demo_builds_data_evaluates_trains_evaluates_and_reports(tmp_path):
    data_dir = str(tmp_path / "data")
    build_demo_data(data_dir, train_size=240, eval_size=24, val_size=16, binding_size=16, assets=fake_assets(tmp_path))
    train_json_mtime = os.path.getmtime(os.path.join(data_dir, "train.json"))
    config = DemoConfig(minutes=5, out=str(tmp_path / "out"), data_dir=data_dir, eval_limit=6, nproc=1,
                        config=tiny_run(tmp_path), binding_steps=2)
    result = run_demo(config)
    # the untuned and the tuned model were scored on the same first 6 questions, every rotation
    assert result.before["overall"]["n"] == result.after["overall"]["n"] == 6
    assert result.before["circular_eval"] and result.after["rows_asked"] == result.before["rows_asked"]
    for key in ("eval_before", "eval_after", "routing"):
        assert os.path.isfile(os.path.join(result.paths[key], "report.json" if key != "routing" else "routing.json"))
    assert result.routing["samples"] == 6 and result.routing["plots"]
    # the checkpoint is the run's last and loads on its own
    assert result.run_state["finished"] and result.run_state["step"] == 3
    assert os.path.basename(result.checkpoint) == "checkpoint-000003"
    MultimodalLM.from_pretrained(result.checkpoint)
    assert set(result.seconds) == {"data", "model", "eval before", "binding stage", "train", "eval after", "routing"}
    # the binding stage trained on binding.json alone, and training continued from its checkpoint
    stage = os.path.dirname(result.paths["binding_stage"])
    assert os.path.basename(result.paths["binding_stage"]) == "checkpoint-000002"
    stage_run = yaml.safe_load(open(os.path.join(stage, "run_config.yaml")))
    assert stage_run["data"].endswith("binding.yaml") and stage_run["optim"]["max_steps"] == 2
    assert stage_run["optim"]["lr"] == BINDING_LR and stage_run["optim"]["schedule"] == "constant"
    # it is measured on held-out binding records and would end at the target; here it ran to its cap
    assert stage_run["stop_at_val_loss"] == BINDING_TARGET and stage_run["val_samples"] == 24 // 4
    assert result.binding["steps"] == 2 and result.binding["val_loss"] > 0 and not result.binding["reached"]
    main_run = yaml.safe_load(open(os.path.join(result.run_dir, "run_config.yaml")))
    assert main_run["model"] == result.paths["binding_stage"]
    assert main_run["optim"]["fit_to_minutes"] and 0 < main_run["optim"]["max_minutes"] < 5  # what the stage left
    table = format_table(result)
    for needle in ("untuned", "tuned", "chance", "by category", "tokens/s", "phases:", result.checkpoint,
                   "binding stage: 2 steps, held-out answer loss", "did not reach the target 0.15",
                   "routing: image vs text only separation per block"):
        assert needle in table
    # a second run reuses the data and keeps the first run's folder, moved aside
    again = run_demo(DemoConfig(minutes=5, out=str(tmp_path / "out"), data_dir=data_dir, nproc=1, skip_eval=True,
                                config=tiny_run(tmp_path), binding_steps=0))
    assert os.path.getmtime(os.path.join(data_dir, "train.json")) == train_json_mtime
    assert os.path.isfile(os.path.join(result.run_dir + ".previous-1", "run_state.json"))
    assert again.before is None and again.after is None and os.path.isdir(again.checkpoint)


def test_demo_refuses_bad_arguments_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="--method"):
        run_demo(DemoConfig(method="dora", out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="--minutes"):
        run_demo(DemoConfig(minutes=0, out=str(tmp_path / "o")))
    assert not os.path.exists(tmp_path / "o")


def test_the_bar_uses_the_circular_lower_bound_and_chance():
    def report(vanilla, circular, n=300, low=None):
        return {"overall": {"vanilla": vanilla, "circular": circular, "chance_circular": 0.0039, "n": n,
                            "circular_ci95": [circular if low is None else low, 1.0]}}

    assert passes_bar(report(0.25, 0.0), report(0.45, 0.05, low=0.03))["passed"]
    assert not passes_bar(report(0.25, 0.0), report(0.35, 0.05, low=0.03))["passed"]  # +10 points only
    assert not passes_bar(report(0.25, 0.0), report(0.45, 0.01, low=0.002))["passed"]  # bound under chance
    assert not passes_bar(report(0.25, 0.04), report(0.45, 0.05, low=0.03))["passed"]  # bound under untuned


def test_the_table_says_when_the_schedule_was_fitted_to_the_minutes():
    state = {"step": 524, "total_steps": 531, "planned_steps": 700, "finished": False,
             "sitting_tokens": 107_000, "sitting_seconds": 1000.0}
    table = format_table(DemoResult(out="o", run_dir="o/teamlora", checkpoint="c", run_state=state))
    assert "524 of 531 steps (the schedule fitted to --minutes; planned 700), 107 tokens/s" in table
    assert "stopped by --minutes" in table
    unfitted = format_table(DemoResult(out="o", run_dir="o/teamlora", checkpoint="c",
                                       run_state={**state, "total_steps": 700, "step": 700, "finished": True}))
    assert "700 of 700 steps, 107 tokens/s" in unfitted and "fitted" not in unfitted


def test_user_overrides_reach_the_binding_stage_but_not_its_own_rate_cap_or_schedule(tmp_path):
    binding = tmp_path / "binding.json"
    binding.write_text(json.dumps([{}] * 40))
    config = DemoConfig(minutes=30, config=tiny_run(tmp_path), binding_steps=200,
                        overrides=["optim.max_steps=700", "optim.lr=1e-4", "optim.schedule=linear",
                                   "optim.fit_to_minutes=true", "seed=3", "adapter.r=16"])
    info = {"binding": str(binding), "binding_config": str(tmp_path / "binding.yaml")}
    stage = RunConfig.from_yaml(config.run_config, _binding_overrides(config, info, str(tmp_path / "stage")))
    assert (stage.optim.max_steps, stage.optim.lr, stage.optim.schedule) == (200, BINDING_LR, "constant")
    assert stage.optim.max_minutes == 10 and not stage.optim.fit_to_minutes and stage.val_samples == 10
    assert stage.seed == 3 and stage.adapter.r == 16 and stage.data.endswith("binding.yaml")
