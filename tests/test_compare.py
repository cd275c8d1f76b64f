"""`mm-teamlora compare` end to end on the tiny preset: 2 methods x 1 seed in this process (nproc 1),
with matched parameter counts, the eval TSV read only after all training, a rerun that retrains
and re-evaluates nothing, and the reports' contents."""

import json
import os

import pytest
import yaml

from conftest import write_tiny_run
from mm_teamlora.adapters import AdapterConfig
from mm_teamlora.adapters.matching import parameter_count
from mm_teamlora.compare import (CompareConfig, CompareConfigError, CompareError, CompareProgress, RunProgress,
                                 compare_progress, format_progress, format_table, is_finished, run_compare, verdict)
from mm_teamlora.compare.report import verdict_line
from mm_teamlora.compare.summary import mean_std
from mm_teamlora.data.demo import build_demo_data
from test_data_demo import fake_assets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("own_cache")


def tiny_run(tmp_path, **adapter) -> str:
    return write_tiny_run(tmp_path / "base.yaml", {"alpha": 16, **adapter}, {"max_steps": 2})


@pytest.fixture
def demo_data(tmp_path):
    data_dir = str(tmp_path / "data")
    build_demo_data(data_dir, train_size=120, eval_size=12, val_size=8, assets=fake_assets(tmp_path))
    return data_dir


def compare_config(tmp_path, data_dir, **fields) -> CompareConfig:
    values = {"base_run": tiny_run(tmp_path), "methods": ["lora", "teamlora"], "seeds": [0], "demo_data": data_dir,
              "eval_limit": 4, "nproc": 1, "out": str(tmp_path / "cmp"), "routing_samples": 4,
              "run_overrides": [f"data={os.path.join(data_dir, 'demo.yaml')}"], **fields}
    return CompareConfig(**values)


def test_compare_config_round_trips_and_names_bad_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"base_run": "base.yaml", "eval_data": "eval.tsv", "seeds": [3, 4],
                                    "alpha_grid": [0.5, 1, 2], "val_data": "val.tsv", "ablations": ["k2"],
                                    "masking_experts": 2, "masking_seed": 7}))
    config = CompareConfig.from_yaml(str(path), ["eval_limit=10", "methods=[lora, teamlora]", "masking_draws=5"])
    assert config.base_run == str(tmp_path / "base.yaml") and config.eval_data == str(tmp_path / "eval.tsv")
    assert config.methods == ["lora", "teamlora"] and config.eval_limit == 10 and config.alpha_grid == [0.5, 1.0, 2.0]
    assert (config.masking_experts, config.masking_seed, config.masking_draws) == (2, 7, 5)
    written = yaml.safe_load(config.to_yaml())
    assert (written["masking_experts"], written["masking_seed"], written["masking_draws"]) == (2, 7, 5)
    assert CompareConfig.from_dict(written) == config
    defaults = CompareConfig(eval_data="eval.tsv")
    assert (defaults.masking_experts, defaults.masking_seed, defaults.masking_draws) == (1, 0, 3)
    for overrides, message in ((["method=lora"], r"unknown key\(s\) method; allowed: base_run"),
                               (["methods=[dora]"], "'dora' is not one of"),
                               (["seeds=[]"], "seeds: must be a non-empty list"),
                               (["ablations=[k3]"], "'k3' is not one of"),
                               (["run_overrides=[seed=3]"], "seed is set by the comparison itself"),
                               (["run_overrides=[optim.max_minutes=5]"], "optim.max_minutes is set by the comparison"),
                               (["alpha_grid=[0]"], "multipliers must be positive"),
                               (["methods=[lora]", "ablations=[moelora_loop]"], "add moelora to methods"),
                               (["masking_experts=0"], r"masking_experts: must be an integer >= 1, got 0"),
                               (["masking_experts=1.5"], r"masking_experts: must be an integer >= 1, got 1.5"),
                               (["masking_seed=-1"], r"masking_seed: must be an integer >= 0, got -1"),
                               (["masking_draws=0"], r"masking_draws: must be an integer >= 1, got 0"),
                               (["masking_draws=true"], r"masking_draws: must be an integer >= 1, got True"),
                               (["binding_steps=-1"], r"binding_steps: must be an integer >= 0, got -1"),
                               (["binding_steps=5"], "binding_steps: the binding stage trains on binding_data")):
        with pytest.raises(CompareConfigError, match=message):
            CompareConfig.from_yaml(str(path), overrides)
    with pytest.raises(CompareConfigError, match="give the eval TSV"):
        CompareConfig(base_run="x.yaml")


def test_the_masking_settings_drive_the_test_and_are_part_of_its_cache_key(tmp_path, monkeypatch):
    """routing/ablation.json is reused while checkpoint, data and the three masking settings agree;
    changing any setting runs the test again with it."""
    import dataclasses
    import types

    import mm_teamlora.eval.ablation as ablation_module
    from fixtures.eval.helpers import question, routed_tiny_model, write_tsv
    from mm_teamlora.compare.evaluation import masking_test
    from mm_teamlora.eval.routing import inspect_routing
    from mm_teamlora.train.checkpoint import STATE_FILE

    rows = [question(i, answer="ABCD"[i % 4]) for i in range(3)]
    rows += [question(100 + i, image="", answer="BCDA"[i % 4]) for i in range(2)]
    tsv = write_tsv(tmp_path / "eval.tsv", rows)
    model = routed_tiny_model("teamlora")
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / STATE_FILE).write_text("{}")
    spec = types.SimpleNamespace(name="teamlora-a1-s0", folder=str(tmp_path / "run"))
    routing = inspect_routing(model, tsv, os.path.join(spec.folder, "routing"), plots=False)
    calls, real = [], ablation_module.ablate

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ablation_module, "ablate", counted)
    config = CompareConfig(eval_data=tsv, routing_samples=0)  # the defaults: 1 expert, seed 0, 3 draws
    first = masking_test(config, spec, str(checkpoint), routing, model)
    assert len(calls) == 1 and first["experts_per_layer"] == 1 and first["random_draws"] == 3
    assert [d["seed"] for d in first["masks"]["random"]["draws"]] == [0, 1, 2]
    stamp = json.load(open(os.path.join(spec.folder, "routing", "ablation.json")))["stamp"]
    assert (stamp["experts"], stamp["seed"], stamp["draws"]) == (1, 0, 3)
    assert masking_test(config, spec, str(checkpoint), routing, model) == first and len(calls) == 1  # unchanged
    changes = {"masking_draws": lambda r: [d["seed"] for d in r["masks"]["random"]["draws"]] == [0, 1],
               "masking_seed": lambda r: [d["seed"] for d in r["masks"]["random"]["draws"]] == [2, 3, 4],
               "masking_experts": lambda r: r["experts_per_layer"] == 2 and all(
                   len(e) == 2 for m in r["masks"].values() for e in m["experts"].values())}
    for key, check in changes.items():
        changed, before = dataclasses.replace(config, **{key: 2}), len(calls)
        result = masking_test(changed, spec, str(checkpoint), routing, model)
        assert len(calls) == before + 1 and check(result), key  # run again, with the new setting
        assert masking_test(changed, spec, str(checkpoint), routing, model) == result  # then reused
        assert len(calls) == before + 1


def test_a_masking_count_no_routed_run_can_take_errors_before_any_training(tmp_path, demo_data, monkeypatch):
    import mm_teamlora.compare.recipe as recipe

    monkeypatch.setattr(recipe, "train_run", lambda *a: pytest.fail("trained before the check"))
    config = compare_config(tmp_path, demo_data, methods=["lora", "teamlora"], ablations=["k2"], masking_experts=2)
    with pytest.raises(CompareConfigError, match="masking_experts: 2 of k2's 2 experts would leave none"):
        run_compare(config)


def test_with_one_seed_the_masking_reading_uses_the_random_draws_spread():
    from mm_teamlora.compare.report import masking_lines
    from mm_teamlora.compare.summary import _masking_summary, masking_means

    def reading(random_std):
        masks = {"image_preferred": {"delta": {"image": 0.4, "text_only": 0.1}, "image_minus_text": 0.3},
                 "text_preferred": {"delta": {"image": 0.1, "text_only": 0.3}, "image_minus_text": -0.2},
                 "random": {"delta": {"image": 0.2, "text_only": 0.2}, "image_minus_text": 0.0,
                            "std": {"image": 0.01, "text_only": 0.01, "image_minus_text": random_std}}}
        ablation = {"baseline": {"image": 2.0, "text_only": 3.0}, "questions": {"image": 4, "text_only": 2},
                    "experts_per_layer": 1, "contrast": "image_vs_text_only", "random_draws": 3, "masks": masks}
        means = masking_means([{"seed": 0, "routing": {"masking": _masking_summary(ablation)}}])
        return masking_lines({"teamlora": {"masking": means}})[-1]

    tight = reading(0.05)  # the gaps (+0.3, -0.2) lie beyond 2 x 0.05
    assert "image_preferred +0.300 vs random (as a causal split predicts; one seed; outside the random " in tight
    assert "± 2 std = ± 0.100" in tight
    assert tight.count("INSIDE") == 0
    assert reading(0.2).count("INSIDE the random draws' ± 2 std = ± 0.400") == 2
    assert "one seed and one random draw: no spread measured" in reading(None)


def test_the_printed_table_has_the_masking_deltas_of_each_routed_method():
    from mm_teamlora.compare import CompareResult
    from mm_teamlora.compare.summary import _masking_summary, masking_means, mean_std

    def run(image_pref):
        masks = {"image_preferred": {"delta": {"image": image_pref, "text_only": 0.01}, "image_minus_text": 0},
                 "text_preferred": {"delta": {"image": 0.02, "text_only": 0.3}, "image_minus_text": 0},
                 "random": {"delta": {"image": 0.05, "text_only": 0.04}, "image_minus_text": 0}}
        ablation = {"baseline": {"image": 2.0, "text_only": 3.0}, "questions": {"image": 4, "text_only": 2},
                    "experts_per_layer": 1, "contrast": "image_vs_text_only", "random_draws": 3, "masks": masks}
        return {"routing": {"masking": _masking_summary(ablation)}}

    def method(masking):
        return {"adapter_parameters": 1000, "vanilla": mean_std([0.3]), "circular": mean_std([0.1]),
                "tokens_per_s_vs_lora": 1.0, "masking": masking}

    summary = {"methods": {"lora": method(None), "moelora": method(None),
                           "teamlora": method(masking_means([run(0.5), run(0.7)]))},
               "chance": 0.25, "chance_circular": 0.004, "questions": 4, "steps": [2]}
    lines = format_table(CompareResult("out", summary)).splitlines()
    masking = [line for line in lines if "masking" in line]
    assert len(masking) == 2  # the routed methods only: not LoRA
    assert masking[0].startswith("moelora") and "not run" in masking[0]
    assert masking[1].startswith("teamlora") and "Δ image / Δ text-only" in masking[1]
    assert "image_preferred +0.600 ± 0.141 / +0.010 ± 0.000" in masking[1]  # the mean ± std over the 2 seeds
    assert "text_preferred +0.020 ± 0.000 / +0.300 ± 0.000" in masking[1] and "random +0.050 ± 0.000" in masking[1]
    assert "2 seed(s)" in masking[1] and "random: 3 draw(s)" in masking[1]


def test_differences_inside_the_seed_spread_are_called_so():
    def method(*values, ci=(0.2, 0.4)):
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
        return {"vanilla": {"mean": mean, "std": std}, "runs": [{"vanilla_ci95": list(ci)}]}

    inside = verdict(method(0.30, 0.34, 0.38), method(0.28, 0.30, 0.32), "vanilla")
    assert inside["basis"] == "seed spread" and inside["inside"] and inside["delta"] == pytest.approx(0.04)
    outside = verdict(method(0.50, 0.51, 0.52), method(0.28, 0.30, 0.32), "vanilla")
    assert not outside["inside"]
    one_seed = verdict(method(0.5, ci=(0.45, 0.55)), method(0.3, ci=(0.25, 0.35)), "vanilla")
    assert one_seed["basis"].startswith("one seed") and not one_seed["inside"]
    assert verdict(method(0.5, ci=(0.3, 0.7)), method(0.3, ci=(0.2, 0.4)), "vanilla")["inside"]


def test_the_speed_claim_gets_a_seed_spread_verdict_and_none_from_one_seed():
    def method(*rates):
        return {"tokens_per_s": mean_std(list(rates)), "runs": [{"vanilla_ci95": [0.2, 0.4]}]}

    # 10% faster, but one run's time spreads widely: a difference the seeds do not support
    noisy = verdict(method(220, 180, 260), method(200, 160, 240), "tokens_per_s")
    assert noisy["inside"] and noisy["relative"] == pytest.approx(0.1) and noisy["spread"] == pytest.approx(80)
    assert verdict_line("teamlora", "moelora", "tokens_per_s", noisy) == (
        "- teamlora vs moelora, tokens/s: +20 tokens/s (+10.0%), INSIDE the seed spread (± 80): "
        "not a difference this comparison can claim")
    steady = verdict(method(220, 221, 219), method(200, 201, 199), "tokens_per_s")
    assert not steady["inside"]
    assert verdict_line("teamlora", "moelora", "tokens_per_s", steady).endswith("outside the seed spread (± 2)")
    # one seed: no interval stands in for a rate, so no claim either way
    single = verdict(method(220), method(200), "tokens_per_s")
    assert single["inside"] is None and single["delta"] == pytest.approx(20)
    assert "one seed: no spread measured, so not a difference" in verdict_line("a", "b", "tokens_per_s", single)


def test_the_checked_in_short_form_reads():
    config = CompareConfig.from_yaml(os.path.join(REPO, "data_configs", "compare", "demo.yaml"))
    assert config.seeds == [0] and not config.alpha_grid and not config.ablations
    assert sorted(config.methods) == ["hydralora", "lora", "moelora", "teamlora"]
    assert config.base_run == os.path.join(REPO, "data_configs", "runs", "demo_teamlora.yaml")
    assert "optim.max_steps=390" in config.run_overrides  # its own step count, not the demo's 700-step cap
    # every method starts from its own binding stage, as the main job's run does, on the demo's binding data
    assert config.binding_steps == 200 and config.binding_path == os.path.join(REPO, "runs", "demo-data",
                                                                                "binding.yaml")


def test_two_methods_one_seed_end_to_end_then_a_rerun_trains_nothing(tmp_path, demo_data, monkeypatch):
    import mm_teamlora.eval.routing as routing_module
    import mm_teamlora.eval.runner as runner_module

    config = compare_config(tmp_path, demo_data)
    eval_tsv = os.path.join(demo_data, "eval.tsv")
    train_dirs = [os.path.join(config.out, "runs", n, "train") for n in ("lora-a1-s0", "teamlora-a1-s0")]
    reads = []
    for module in (runner_module, routing_module):
        def spy(path, *args, _original=module.read_mmbench, **kwargs):
            reads.append((os.path.abspath(str(path)), [is_finished(d) for d in train_dirs]))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(module, "read_mmbench", spy)
    result = run_compare(config)
    assert result.trained == ["lora-a1-s0", "teamlora-a1-s0"]

    # the eval TSV was read only once both runs had finished training
    eval_reads = [finished for path, finished in reads if path == os.path.abspath(eval_tsv)]
    assert eval_reads and all(all(f) for f in eval_reads)

    # matched trainable parameters: LoRA's rank is the one whose count is closest to TeamLoRA's,
    # and the counts are those of the model training builds (the formula agrees)
    summary = result.summary
    plan = json.load(open(os.path.join(config.out, "plan.json")))
    team, lora = plan["entries"]["teamlora"], plan["entries"]["lora"]
    assert team["r"] == 8 and plan["reference_adapter_parameters"] == team["adapter_parameters"]
    shapes_count = lambda r: parameter_count(_shapes(), AdapterConfig(method="lora", r=r))  # noqa: E731
    target = team["adapter_parameters"]
    assert all(abs(shapes_count(lora["r"]) - target) <= abs(shapes_count(lora["r"] + d) - target) for d in (-1, 1))
    for entry in (team, lora):
        assert entry["adapter_parameters"] == entry["formula_count"]
        assert entry["trainable_parameters"] > entry["adapter_parameters"]  # the projector trains too
    # the same update gain at uniform routing: TeamLoRA alpha / (r/k) = 16 / 2 = 8 = LoRA's alpha / r
    assert team["effective_gain"] == pytest.approx(8.0) and lora["effective_gain"] == pytest.approx(8.0)
    assert lora["alpha"] == pytest.approx(8.0 * lora["r"])

    # the same optimizer steps, the seed given to the run and its adapter
    assert summary["same_steps"] and summary["steps"] == [2]
    for name in ("lora-a1-s0", "teamlora-a1-s0"):
        run_config = yaml.safe_load(open(os.path.join(config.out, "runs", name, "train", "run_config.yaml")))
        assert run_config["seed"] == 0 and run_config["adapter"]["seed"] == 0
        assert run_config["optim"]["max_minutes"] is None and run_config["optim"]["max_steps"] == 2
    assert run_config["adapter"]["method"] == "teamlora" and run_config["adapter"]["alpha"] == 16

    # compare.json: every count, accuracy with chance, speed ratios, routing for the routed method
    methods = summary["methods"]
    assert set(methods) == {"lora", "teamlora"} and summary["questions"] == 4
    for name, a in methods.items():
        assert a["adapter_parameters"] == plan["entries"][name]["adapter_parameters"]
        assert 0.0 <= a["vanilla"]["mean"] <= 1.0 and a["vanilla"]["std"] is None  # one seed: no spread
        assert a["tokens_per_s"]["mean"] > 0 and a["peak_mem_mb"]["mean"] > 0 and a["steps"] == [2]
        assert a["by_category"]
    assert methods["lora"]["tokens_per_s_vs_lora"] == pytest.approx(1.0)
    assert methods["teamlora"]["routing_js_bits"]["mean"] is not None
    assert methods["lora"]["routing_js_bits"]["mean"] is None
    assert 0 < summary["chance"] < 1 and summary["comparisons"]["teamlora_vs_lora"]["vanilla"]["basis"].startswith(
        "one seed")
    assert summary["comparisons"]["teamlora_vs_lora"]["tokens_per_s"]["inside"] is None  # one seed: no speed claim
    md = open(result.paths["md"]).read()
    assert "- teamlora vs lora, tokens/s: " in md
    for needle in ("| lora |", "| teamlora |", f"{target:,}", "chance", "one seed: no seed spread measured",
                   "## By category", "No alpha grid was run", "No ablations were run", "causal masking"):
        assert needle in md, needle
    # compare.png is written, so the plot is not among the things this command has not done
    assert "plot" not in md.rpartition("Not yet measured")[2] and "plot" not in summary["not_done"]
    table = format_table(result)
    assert "teamlora" in table and "teamlora     masking Δ image / Δ text-only loss: image_preferred" in table
    assert "random: 3 draw(s)" in table
    assert os.path.getsize(result.paths["plot"]) > 0

    # a rerun trains nothing and evaluates nothing: the same reports
    before = open(result.paths["json"]).read()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished comparison was trained or evaluated again")

    import mm_teamlora.model as model_module
    import mm_teamlora.train as train_module

    monkeypatch.setattr(train_module, "train", refuse)
    monkeypatch.setattr(model_module.MultimodalLM, "from_pretrained", refuse)
    again = run_compare(config)
    assert again.trained == [] and open(again.paths["json"]).read() == before

    # a run folder made with other settings is refused, never overwritten
    changed = compare_config(tmp_path, demo_data, run_overrides=[*config.run_overrides, "optim.lr=0.5"])
    with pytest.raises(CompareError, match="made with other settings"):
        run_compare(changed)


def stop_a_sitting_early(monkeypatch, n: int) -> list[tuple]:
    """The n-th training sitting stops after one step, saved, as a killed one would; the returned
    list gets every sitting's (resume, overwrite)."""
    import mm_teamlora.train as train_module

    calls, real = [], train_module.train

    def train(run, resume=None, overwrite=False):
        calls.append((resume, overwrite))
        if len(calls) == n:
            run.optim.max_minutes = 1e-9
        return real(run, resume=resume, overwrite=overwrite)

    monkeypatch.setattr(train_module, "train", train)
    return calls


def test_an_unfinished_run_resumes_and_an_empty_one_restarts(tmp_path, demo_data, monkeypatch):
    """A run stopped after a checkpoint continues with --resume auto; a folder without one starts over."""
    config = compare_config(tmp_path, demo_data, methods=["lora"], base_run=tiny_run(tmp_path, method="lora", r=4),
                            eval_limit=2)
    calls = stop_a_sitting_early(monkeypatch, 1)
    with pytest.raises(CompareError, match="before its last step"):
        run_compare(config)
    result = run_compare(config)
    assert calls == [(None, False), ("auto", False)]
    assert result.trained == ["lora-a1-s0"] and result.summary["methods"]["lora"]["steps"] == [2]
    sittings = json.load(open(os.path.join(config.out, "runs", "lora-a1-s0", "sittings.json")))
    assert [s["resumed"] for s in sittings] == [False, True]


def test_a_sitting_the_comparison_died_with_still_counts_in_the_run_time_and_tokens(tmp_path, demo_data,
                                                                                     monkeypatch):
    """Killing the comparison kills the sitting and the process that would have recorded it in
    sittings.json; the run's training time and tokens come from its checkpoints, which carry them
    from sitting to sitting."""
    config = compare_config(tmp_path, demo_data, methods=["lora"], base_run=tiny_run(tmp_path, method="lora", r=4),
                            eval_limit=2)
    stop_a_sitting_early(monkeypatch, 1)
    with pytest.raises(CompareError, match="before its last step"):
        run_compare(config)
    folder = os.path.join(config.out, "runs", "lora-a1-s0")
    first = json.load(open(os.path.join(folder, "train", "run_state.json")))
    os.remove(os.path.join(folder, "sittings.json"))  # what a kill of the whole comparison leaves
    result = run_compare(config)
    second = json.load(open(os.path.join(folder, "train", "run_state.json")))
    training = result.summary["methods"]["lora"]["runs"][0]["training"]
    assert (first["step"], second["step"], training["sittings"]) == (1, 2, 1)
    assert training["tokens"] == first["sitting_tokens"] + second["sitting_tokens"] == second["run_tokens"]
    assert training["train_seconds"] == pytest.approx(first["sitting_seconds"] + second["sitting_seconds"], abs=0.1)


def test_status_says_how_far_a_comparison_has_got_from_its_folder_alone(tmp_path, demo_data, monkeypatch, capsys):
    """`compare --status`: each run's stage and steps, the grid's scores and choice once its runs are
    scored, the main runs that wait for it, what is evaluated; it trains and evaluates nothing."""
    import mm_teamlora.model as model_module
    import mm_teamlora.train as train_module
    from mm_teamlora.cli import main

    config = compare_config(tmp_path, demo_data, methods=["lora"], base_run=tiny_run(tmp_path, method="lora", r=4),
                            seeds=[0, 1], alpha_grid=[0.5, 1.0], eval_limit=2, val_limit=2)
    path = tmp_path / "compare.yaml"
    path.write_text(config.to_yaml())
    assert compare_progress(config).plan == "missing"

    stop_a_sitting_early(monkeypatch, 2)  # the second grid run, lora-a1-s0
    with pytest.raises(CompareError, match="lora-a1-s0"):
        run_compare(config)
    progress = compare_progress(config)
    rows = {r.name: r for r in progress.runs}
    assert list(rows) == ["lora-a0.5-s0", "lora-a1-s0", "lora-a?-s1"]
    assert (rows["lora-a0.5-s0"].state, rows["lora-a0.5-s0"].step, rows["lora-a0.5-s0"].total) == ("finished", 2, 2)
    assert rows["lora-a0.5-s0"].val_loss > 0 and rows["lora-a0.5-s0"].wall_seconds > 0
    assert (rows["lora-a1-s0"].state, rows["lora-a1-s0"].step, rows["lora-a1-s0"].total) == ("training", 1, 2)
    assert rows["lora-a1-s0"].val_loss is None and rows["lora-a?-s1"].state == "waits for the grid"
    assert progress.chosen == {} and progress.finished == 1 and progress.training_seconds_left > 0

    monkeypatch.undo()
    result = run_compare(config)
    chosen = result.summary["alpha_grid"]["chosen"]["lora"]

    def refuse(*args, **kwargs):
        raise AssertionError("the status trained or loaded a model")

    monkeypatch.setattr(train_module, "train", refuse)
    monkeypatch.setattr(model_module.MultimodalLM, "from_pretrained", refuse)
    progress = compare_progress(config)
    assert progress.chosen == {"lora": chosen} and progress.finished == len(progress.runs) == 3
    main_run = f"lora-a{chosen:g}-s0"
    assert {r.name: r.kind for r in progress.runs}[main_run] == "grid, main"
    assert [r.name for r in progress.runs if r.evaluated] == [main_run, f"lora-a{chosen:g}-s1"]
    assert progress.training_seconds_left == 0
    assert main(["compare", str(path), "--status"]) == 0
    printed = capsys.readouterr().out
    assert "3 of 3 runs trained, 2 evaluated" in printed and f"alpha grid chose: lora x{chosen:g}" in printed
    assert "waits for the grid" not in printed and main_run in printed


def test_status_columns_stay_aligned_when_a_run_name_outgrows_them():
    """The longest run name (an ablation's, e.g. group_routing_off-a0.5-s0) widens the name column
    instead of shifting its row's later columns."""
    runs = [RunProgress("lora-a1-s0", "grid, main", "finished", 390, 390, 1.1674, True, 1512.0),
            RunProgress("group_routing_off-a0.5-s0", "ablation", "not started")]
    lines = format_progress(CompareProgress("runs/x", "ok", runs)).splitlines()[1:4]
    kind_at = [line.index(kind) for line, kind in zip(lines, ["kind", "grid, main", "ablation"])]
    assert len(set(kind_at)) == 1, kind_at


def test_each_run_trains_from_its_own_binding_stage(tmp_path, monkeypatch):
    """With binding_steps, each run first trains its binding stage (the demo's: binding data, constant
    rate, stop rule; the run's own adapter and seed, no time budget), then its steps from that
    stage's checkpoint; the report says what each stage did; other binding settings are refused."""
    from mm_teamlora.demo import BINDING_LR, BINDING_TARGET

    data_dir = str(tmp_path / "data")
    build_demo_data(data_dir, train_size=120, eval_size=12, val_size=8, binding_size=24, assets=fake_assets(tmp_path))
    without = compare_config(tmp_path, str(tmp_path / "no-binding"), binding_steps=2, out=str(tmp_path / "x"))
    build_demo_data(without.demo_data, train_size=120, eval_size=12, val_size=8, assets=fake_assets(tmp_path))
    with pytest.raises(CompareConfigError, match="binding.yaml not found; demo data built with --binding-size 0"):
        run_compare(without)

    config = compare_config(tmp_path, data_dir, binding_steps=2, binding_val=4, eval_limit=2, routing_samples=2)
    result = run_compare(config)
    assert result.trained == ["lora-a1-s0", "teamlora-a1-s0"]
    for name, method in (("lora-a1-s0", "lora"), ("teamlora-a1-s0", "teamlora")):
        folder = os.path.join(config.out, "runs", name)
        stage = yaml.safe_load(open(os.path.join(folder, "binding", "run_config.yaml")))
        main = yaml.safe_load(open(os.path.join(folder, "train", "run_config.yaml")))
        assert stage["data"] == os.path.join(data_dir, "binding.yaml") and stage["optim"]["lr"] == BINDING_LR
        assert stage["optim"]["schedule"] == "constant" and stage["optim"]["max_minutes"] is None
        assert stage["stop_at_val_loss"] == BINDING_TARGET and stage["val_samples"] == 4
        assert stage["adapter"] == main["adapter"] and stage["adapter"]["method"] == method and stage["seed"] == 0
        assert main["model"] == os.path.abspath(os.path.join(folder, "binding"))
        assert main["data"] == os.path.join(data_dir, "demo.yaml") and main["optim"]["max_steps"] == 2
        sittings = json.load(open(os.path.join(folder, "sittings.json")))
        assert [(s["stage"], s["step"]) for s in sittings] == [("binding", 2), ("train", 2)]
        binding = result.summary["methods"][method]["binding"]
        assert binding["steps"]["mean"] == 2 and binding["runs"] == 1 and binding["val_loss"]["mean"] > 0
    md = open(result.paths["md"]).read()
    assert "| binding steps |" in md and "| lora | 2 |" in md

    # the binding stage is part of a run's settings: another cap is another run
    with pytest.raises(CompareError, match="made with other settings"):
        run_compare(compare_config(tmp_path, data_dir, binding_steps=3, binding_val=4, eval_limit=2,
                                   routing_samples=2))


@pytest.mark.slow
def test_grid_ablations_and_two_ranks(tmp_path, demo_data):
    """The alpha grid on the validation split, an ablation, and the DeepSpeed launcher (2 CPU ranks)."""
    config = compare_config(tmp_path, demo_data, methods=["moelora", "teamlora"], nproc=2, alpha_grid=[0.5, 1.0],
                            ablations=["no_competition", "moelora_loop"], val_limit=4)
    result = run_compare(config)
    grid = result.summary["alpha_grid"]
    assert set(grid["scores"]) == {"moelora", "teamlora"} and all(len(v) == 2 for v in grid["scores"].values())
    assert set(result.summary["ablations"]) == {"no_competition", "moelora_loop"}
    plan = json.load(open(os.path.join(config.out, "plan.json")))
    assert plan["entries"]["moelora"]["r"] == 8  # MoELoRA at TeamLoRA's r: the same capacity less M
    assert plan["entries"]["no_competition"]["adapter_parameters"] < plan["reference_adapter_parameters"]
    # the chosen multiplier's grid run is the main run: 4 grid runs + 2 ablations trained, no more
    assert len(result.trained) == 6
    assert "## Alpha grid" in open(result.paths["md"]).read()


def _shapes():
    from mm_teamlora.adapters.matching import layer_shapes
    from mm_teamlora.model import MultimodalConfig, MultimodalLM

    model = MultimodalLM.from_config(MultimodalConfig.preset("tiny-random"))
    return layer_shapes(model.language_model, AdapterConfig(method="teamlora", r=8, num_experts=4))


def test_the_cli_command_exits_2_on_unusable_arguments(tmp_path, capsys):
    from mm_teamlora.cli import main

    demo = os.path.join(REPO, "data_configs", "compare", "demo.yaml")
    assert main(["compare", demo, "methods=[dora]", "--out", str(tmp_path / "o")]) == 2
    assert "'dora' is not one of" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing.yaml")]) == 2
    assert not os.path.exists(tmp_path / "o")
