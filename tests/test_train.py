"""The training room on one process through the DeepSpeed engine (tiny preset, fixtures mixture)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers import randomize_adapters
from mm_teamlora.adapters import AdapterConfig, adapter_layers
from mm_teamlora.adapters.matching import layer_shapes, matching_rank, parameter_count
from mm_teamlora.data import MixtureConfig, build_dataset
from mm_teamlora.model import MultimodalLM
from mm_teamlora.train import RunConfig, RunConfigError, train
from mm_teamlora.train.checkpoint import checkpoints, latest
from mm_teamlora.train.data import collate_with_names
from mm_teamlora.train.engine import (Schedule, build_model, build_optimizer, deepspeed_config, init_distributed,
                                     initialize, parameter_groups)
from mm_teamlora.train.loop import train_step
from mm_teamlora.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "data_configs", "fixtures.yaml")


@pytest.fixture(autouse=True, scope="module")
def own_cache(tmp_path_factory):
    """Tokenised sources and torch's compiled comm op stay out of the user's caches."""
    old = os.environ.get("MM_TEAMLORA_CACHE")
    os.environ["MM_TEAMLORA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("MM_TEAMLORA_CACHE")
    else:
        os.environ["MM_TEAMLORA_CACHE"] = old


def config_dict(tmp_path, **top) -> dict:
    data = {"data": FIXTURES, "model": "tiny-random", "output_dir": str(tmp_path / "run"),
            "adapter": {"method": "teamlora", "r": 8, "num_experts": 4, "dropout": 0.0},
            "optim": {"lr": 1e-2, "micro_batch_size": 2, "grad_accum": 2, "max_steps": 4},
            "deepspeed": 2, "log_steps": 1, "tensorboard": False}
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def run_config(tmp_path, overrides=(), **top) -> RunConfig:
    return RunConfig.from_dict(config_dict(tmp_path, **top), overrides=list(overrides))


# -- the run config ---------------------------------------------------------------------------
def test_run_config_round_trips_through_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path, data="../data_configs/fixtures.yaml")))
    (tmp_path / "data_configs").mkdir()
    config = RunConfig.from_yaml(str(path), ["adapter.method=lora", "optim.lr=1e-4", "optim.max_minutes=2.5",
                                             "seed=7", "deepspeed=3"])
    assert config.adapter.method == "lora" and config.optim.lr == 1e-4 and config.optim.max_minutes == 2.5
    assert config.adapter.seed == 7  # the run's seed also seeds the adapter unless it names its own
    assert config.data == os.path.normpath(str(tmp_path / "../data_configs/fixtures.yaml"))  # against the file
    again = RunConfig.from_dict(yaml.safe_load(config.to_yaml()))
    assert again == config
    assert RunConfig.from_dict(config_dict(tmp_path, optim={"lr": "2e-4"})).optim.lr == 2e-4  # YAML's string


@pytest.mark.parametrize("overrides, message", [
    (["optim.learning_rate=1"], r"unknown key\(s\) optim.learning_rate; allowed: lr, projector_lr"),
    (["batch=4"], r"unknown key\(s\) batch; allowed: data, model, output_dir"),
    (["optim.lr=-1"], r"optim.lr: must be positive"),
    (["adapter.r=10"], r"r=10 is not divisible by num_experts=4"),
    (["adapter.method=dora"], r"method='dora'"),
    (["deepspeed=5"], r"deepspeed: must be one of 0, 1, 2, 3"),
    (["precision=fp16"], r"precision: must be one of fp32, bf16"),
    (["optim=3"], r"optim: expected a mapping"),
    (["optim.lr"], r"write KEY=VALUE"),
    (["stop_at_val_loss=0.1"], r"stop_at_val_loss: needs val_samples > 0 and eval_steps > 0"),
    (["stop_at_val_loss=-1", "val_samples=2", "eval_steps=2"], r"stop_at_val_loss: must be >= 0"),
    (["supervised_logits=sometimes"], r"supervised_logits: must be true or false"),
    (["optim.fit_to_minutes=true"], r"optim.fit_to_minutes: needs optim.max_minutes"),
])
def test_bad_keys_and_values_name_the_key(tmp_path, overrides, message):
    with pytest.raises(RunConfigError, match=message):
        run_config(tmp_path, overrides)


def test_bad_runs_fail_before_any_process_group(tmp_path, monkeypatch):
    import mm_teamlora.train.run as run_module

    monkeypatch.setattr(run_module, "init_distributed", lambda: pytest.fail("a process group was started"))
    with pytest.raises(RunConfigError, match="mixture .*nowhere.yaml not found"):
        train(run_config(tmp_path, data=str(tmp_path / "nowhere.yaml")))
    with pytest.raises(RunConfigError, match="neither a checkpoint folder nor a preset"):
        train(run_config(tmp_path, model="no-such-model"))
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(RunConfigError, match="train_micro_batch_size_per_gpu is 8 but the run config gives 2"):
        train(run_config(tmp_path, deepspeed=str(zero)))
    zero.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(RunConfigError, match="has an 'optimizer' section"):
        train(run_config(tmp_path, deepspeed=str(zero)))
    with pytest.raises(RunConfigError, match="not a complete checkpoint folder"):
        train(run_config(tmp_path), resume=str(tmp_path))
    os.makedirs(tmp_path / "run" / "checkpoint-000004")
    (tmp_path / "run" / "checkpoint-000004" / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "run_state.json").write_text('{"finished": true}')
    with pytest.raises(RunConfigError, match="holds a finished run; .*--resume auto.*--overwrite"):
        train(run_config(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for CPUs")
def test_bf16_on_a_cpu_warns_that_it_is_slow(tmp_path, caplog):
    from mm_teamlora.train.run import preflight

    with caplog.at_level("WARNING"):
        preflight(run_config(tmp_path, precision="bf16"), 1, None, False)
    assert "bf16 matmul is far slower than fp32" in caplog.text


def test_zero_json_auto_values_are_filled_from_the_run(tmp_path):
    zero = tmp_path / "zero3.json"
    zero.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                                "bf16": {"enabled": "auto"},
                                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto",
                                                      "reduce_bucket_size": "auto"}}))
    config = deepspeed_config(run_config(tmp_path, deepspeed=str(zero)), world_size=2, hidden_size=64)
    assert config["train_batch_size"] == 2 * 2 * 2 and config["gradient_accumulation_steps"] == 2
    assert config["bf16"]["enabled"] is False and config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 640,
                                           "reduce_bucket_size": 4096}


def test_parameter_groups_keep_decay_off_routers_interactions_biases_and_norms(tmp_path):
    run = run_config(tmp_path, adapter={"group_routing": True, "modules_to_save": ["model.norm"]},
                     optim={"weight_decay": 0.1, "projector_lr": 1e-3})
    model = build_model(run)
    groups = {g["name"]: g for g in parameter_groups(model, run)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)].rsplit(".", 1)[-1] for p in g["params"]} for k, g in groups.items()}
    assert members["adapters"] == {"lora_A", "lora_B"} and groups["adapters"]["weight_decay"] == 0.1
    assert members["routing"] == {"router", "competition", "group_bias"} and groups["routing"]["weight_decay"] == 0
    assert members["no_decay"] == {"weight"} and groups["no_decay"]["weight_decay"] == 0  # the norm
    assert groups["projector"]["lr"] == 1e-3 and groups["projector"]["weight_decay"] == 0.1
    assert members["projector_no_decay"] == {"bias"} and groups["projector_no_decay"]["weight_decay"] == 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == trainable


def test_the_fused_optimizer_makes_the_reference_adamw_update_in_every_group(tmp_path):
    run = run_config(tmp_path, adapter={"group_routing": True}, optim={"weight_decay": 0.1, "projector_lr": 3e-3})
    model = build_model(run)
    optimizer, _ = build_optimizer(model, run, total_steps=10)
    assert all(g["fused"] for g in optimizer.param_groups)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    reference = torch.optim.AdamW([{**g, "params": [p.detach().clone().requires_grad_() for p in g["params"]],
                                    "fused": False, "foreach": False} for g in optimizer.param_groups])
    twins = [p for g in reference.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    assert not any(torch.equal(p, b) for p, b in zip(params, before))  # every tensor moved
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_matching_rank_gives_lora_and_hydralora_the_routed_methods_count():
    from conftest import tiny_model

    reference = AdapterConfig(method="teamlora", r=64, num_experts=4)
    shapes = layer_shapes(tiny_model(), reference)
    target = parameter_count(shapes, reference)
    for method in ("lora", "hydralora"):
        r = matching_rank(shapes, reference, method)
        counts = {d: parameter_count(shapes, AdapterConfig(method=method, r=r + d, num_experts=4)) for d in (-1, 0, 1)}
        assert abs(counts[0] - target) <= min(abs(counts[-1] - target), abs(counts[1] - target))
    assert matching_rank(shapes, reference, "hydralora") < 64 < matching_rank(shapes, reference, "lora")
    # the formula is the count the layers really have
    from mm_teamlora.adapters import apply_adapters, trainable_parameter_report

    for method in ("lora", "moelora", "hydralora", "teamlora"):
        config = AdapterConfig(method=method, r=8, num_experts=4, group_routing=True)
        assert trainable_parameter_report(apply_adapters(tiny_model(), config)).adapter == parameter_count(
            layer_shapes(tiny_model(), config), config)


# -- the loss ---------------------------------------------------------------------------------
def _engine(tmp_path, micro, gas):
    run = run_config(tmp_path, adapter={"balance_weight": 0.0},
                     optim={"micro_batch_size": micro, "grad_accum": gas, "max_grad_norm": None})
    model = build_model(run)
    randomize_adapters(model.language_model, seed=5, scale=0.2)  # zero B would leave A and routers without grad
    init_distributed()
    engine, optimizer, _ = initialize(model, run, world_size=1, total_steps=10)
    captured = []
    inner = optimizer.optimizer
    inner.register_step_pre_hook(lambda opt, args, kwargs: captured.append(
        [p.grad.detach().clone() for g in opt.param_groups for p in g["params"]]))
    return engine, model, captured


def test_accumulation_of_two_micro_batches_equals_one_batch_of_four(tmp_path):
    engine, model, _ = _engine(tmp_path / "probe", 2, 2)
    dataset = build_dataset(MixtureConfig.from_yaml(FIXTURES), **model.data_inputs())
    from mm_teamlora.data import DataCollator

    collator = DataCollator.from_tokenizer(model.tokenizer)
    by_length = sorted(range(len(dataset)), key=lambda i: int(dataset.lengths[i]))
    chosen = [by_length[0], by_length[1], by_length[-2], by_length[-1]]  # short pair, long pair
    items = [dataset[i] for i in chosen]
    assert dataset.lengths[chosen[0]] < dataset.lengths[chosen[-1]] / 2
    grads = {}
    for micro, gas, parts in ((2, 2, [items[:2], items[2:]]), (4, 1, [items])):
        engine, _, captured = _engine(tmp_path / f"{micro}x{gas}", micro, gas)
        stats, _ = train_step(engine, [collate_with_names(collator, p) for p in parts], ["llava", "alpaca", "messages"],
                              world_size=1)
        grads[gas] = captured[0]
        losses = stats.loss_sum / stats.supervised
        grads[f"loss{gas}"] = losses
    assert grads["loss1"] == pytest.approx(grads["loss2"], rel=1e-5)
    assert len(grads[1]) == len(grads[2]) and all(float(g.abs().max()) > 0 for g in grads[1])
    for one, accumulated in zip(grads[1], grads[2]):  # float32 sums in another order: 1e-5 of the scale
        torch.testing.assert_close(accumulated, one, rtol=1e-4, atol=1e-5 * float(one.abs().max()))


# -- whole runs --------------------------------------------------------------------------------
def _frozen_and_trained(model):
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    return state


def test_a_run_learns_changes_only_adapters_and_projector_and_every_checkpoint_loads(tmp_path):
    run = run_config(tmp_path, optim={"max_steps": 12, "lr": 2e-2, "warmup_ratio": 0.0}, save_steps=6,
                     val_samples=2, eval_steps=6, tensorboard=True, adapter={"group_routing": True})
    before = _frozen_and_trained(build_model(run))
    result = train(run)
    assert result.finished and result.steps == 12 and result.tokens_per_s > 0
    records = read_metrics(os.path.join(run.output_dir, "metrics.jsonl"))
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    step = next(r for r in records if "loss" in r)
    assert {"lr", "grad_norm", "tokens_per_s", "supervised_tokens", "tokens_by_group", "loss_by_source",
            "aux_loss", "routing"} <= set(step)
    assert set(step["loss_by_source"]) <= {"llava", "alpaca", "messages"}
    assert set(step["routing"]["mean_router_prob"]) <= {"image", "text_with_image", "text_only"}
    assert [r["step"] for r in records if r.get("split") == "val"] == [6, 12]
    assert os.path.isfile(os.path.join(run.output_dir, "loss_curve.png"))
    assert os.listdir(os.path.join(run.output_dir, "tb"))
    folders = checkpoints(run.output_dir)
    assert [os.path.basename(f) for f in folders] == ["checkpoint-000006", "checkpoint-000012"]
    assert latest(run.output_dir) == folders[-1] == result.checkpoint
    assert sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folders[-1]) for f in fs) < 5e6
    loaded = {os.path.basename(f): MultimodalLM.from_pretrained(f) for f in folders}
    for name, model in loaded.items():  # each equals the engine's own record of the live model then
        engine_state = torch.load(os.path.join(run.output_dir, name, "trainer_state", "engine",
                                               "mp_rank_00_model_states.pt"), weights_only=False)["module"]
        saved = model.checkpoint_state_dict()
        assert set(engine_state) == {k for k, v in saved.items() if isinstance(v, torch.nn.Parameter)}
        for key, value in engine_state.items():
            torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    after = _frozen_and_trained(loaded["checkpoint-000012"])
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("projector.") or ".lora_" in n or n.rsplit(".", 1)[-1] in
                           ("router", "competition", "group_bias") for n in changed)
    assert any(n.startswith("projector.") for n in changed) and any("lora_B" in n for n in changed)
    # a rerun of a finished run trains nothing
    again = train(run, resume="auto")
    assert again.steps == 12 and again.train_seconds == 0.0


def caption_mixture(tmp_path) -> str:
    """Caption records (one exchange, an image each) under a chat-template mixture."""
    from fixtures.data.helpers import llava, make_image, write_json

    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (120, 120, 120)}
    records = [llava(f"c{i}", "<image>\nDescribe the image.", f"A {name} square.",
                     image=os.path.basename(make_image(tmp_path / f"{name}.png", color=rgb)))
               for i, (name, rgb) in enumerate(colours.items())]
    write_json(tmp_path / "captions.json", records)
    (tmp_path / "captions.yaml").write_text("template: chat\nsources:\n  - path: captions.json\n    image_root: .\n")
    return str(tmp_path / "captions.yaml")


def test_stage1_trains_the_projector_alone(tmp_path):
    run = run_config(tmp_path, stage="pretrain_projector", optim={"max_steps": 2}, data=caption_mixture(tmp_path))
    before = _frozen_and_trained(build_model(run))
    result = train(run)
    model = MultimodalLM.from_pretrained(result.checkpoint)
    assert not adapter_layers(model.language_model)
    after = _frozen_and_trained(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("projector.") for n in changed)


def test_max_minutes_stops_every_rank_at_a_step_boundary_with_a_checkpoint(tmp_path):
    run = run_config(tmp_path, optim={"max_steps": 50, "max_minutes": 1e-6})
    result = train(run)
    assert not result.finished and result.steps == 1 and result.total_steps == 50
    state = json.load(open(os.path.join(result.checkpoint, "trainer_state.json")))
    assert state["stopped_by"] == "max_minutes" and state["step"] == 1
    assert json.load(open(os.path.join(run.output_dir, "run_state.json")))["finished"] is False
    with pytest.raises(RunConfigError, match="unfinished run"):
        train(run)
    resumed = train(RunConfig.from_dict(run.to_dict(), overrides=["optim.max_minutes=null"]), resume="auto")
    assert resumed.finished and resumed.steps == 50


def test_a_fitted_schedule_keeps_its_warm_up_ends_its_decay_at_the_new_length_and_survives_the_state_dict():
    def factors(schedule, steps):
        return [schedule(s) for s in range(steps)]

    planned = Schedule(100, 0.1, "cosine", 0.0)
    fitted = Schedule(100, 0.1, "cosine", 0.0)
    fitted.fit(40)
    assert fitted.fitted and not planned.fitted and fitted.warmup == planned.warmup == 10
    assert factors(fitted, 10) == factors(planned, 10)  # the warm-up it started with
    assert fitted(10) == planned(10) == 1.0 and fitted(40) == 0.0 and planned(40) > 0.5
    assert fitted(25) == pytest.approx(0.5)  # halfway through the decay over 40 - 10 steps
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    saved = torch.optim.lr_scheduler.LambdaLR(optimizer, fitted).state_dict()
    restored = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(100, 0.1, "cosine", 0.0))
    restored.load_state_dict(saved)
    assert restored.lr_lambdas[0].total == 40 and restored.lr_lambdas[0].fitted


class VirtualClock:
    """The training loop's `time.perf_counter` (run.py, loop.py) on a clock that moves only when a
    test moves it: a time-bounded run then ends at the same step whatever the machine's load."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    from types import SimpleNamespace

    from mm_teamlora.train import loop
    from mm_teamlora.train import run as run_module

    virtual = VirtualClock()
    for module in (run_module, loop):
        monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=virtual))
    return virtual


def steps_cost(monkeypatch, clock, seconds) -> None:
    """Each training step moves the clock by seconds(n), n counting the steps from 1."""
    from mm_teamlora.train import run as run_module

    step, done = run_module.train_step, [0]

    def timed(*args, **kwargs):
        done[0] += 1
        clock.now += seconds(done[0])
        return step(*args, **kwargs)

    monkeypatch.setattr(run_module, "train_step", timed)


def fitted_ends(caplog) -> list[int]:
    fits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit_to_minutes: the schedule now")]
    assert fits and "(planned 5000)" in fits[0] and all("(was " in f for f in fits[1:])
    return [int(f.split("ends at step ")[1].split()[0]) for f in fits]


def last_lr(run) -> float:
    return [r["lr"]["adapters"] for r in read_metrics(os.path.join(run.output_dir, "metrics.jsonl")) if "lr" in r][-1]


FITTED = {"max_steps": 5000, "fit_to_minutes": True, "warmup_ratio": 0.001, "grad_accum": 1}


def test_fit_to_minutes_ends_a_time_bounded_run_with_its_decay_done_and_resume_keeps_the_fitted_length(
        tmp_path, clock, monkeypatch, caplog):
    steps_cost(monkeypatch, clock, lambda n: 0.05)
    run = run_config(tmp_path, optim={**FITTED, "max_minutes": 0.1})
    with caplog.at_level("INFO", logger="mm_teamlora.train.run"):
        result = train(run)
    # fitted once, after 10 measured steps: 95% of the 5.45 s left at 0.05 s a step; a steady pace refits nothing
    assert fitted_ends(caplog) == [11 + 103] and result.total_steps == 114 and result.finished
    state = json.load(open(os.path.join(run.output_dir, "run_state.json")))
    assert state["planned_steps"] == 5000 and state["total_steps"] == result.total_steps
    assert last_lr(run) < 0.03 * 1e-2  # the decay is done
    again = train(RunConfig.from_dict(run.to_dict(), overrides=["optim.max_minutes=5"]), resume="auto")
    assert again.total_steps == result.total_steps and again.finished  # the fitted length, not 5000


def test_saves_after_the_fit_shorten_the_schedule_again_so_the_run_still_ends_its_decay(tmp_path, clock, caplog,
                                                                                         monkeypatch):
    # the first fit (after 10 steps) has seen no save; each save after it costs 0.4 s here, which
    # raises the sitting's seconds per step past the fit's 5% margin, so the schedule is refitted
    from mm_teamlora.train import checkpoint

    def slow_save(*args, save=checkpoint.save, **kwargs):
        clock.now += 0.4
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    steps_cost(monkeypatch, clock, lambda n: 0.05)
    run = run_config(tmp_path, optim={**FITTED, "max_minutes": 0.15}, save_steps=15)
    with caplog.at_level("INFO", logger="mm_teamlora.train.run"):
        result = train(run)
    ends = fitted_ends(caplog)
    assert len(ends) >= 2 and ends == sorted(ends, reverse=True) and ends[-1] == result.total_steps  # only shorten
    assert result.finished and last_lr(run) < 0.03 * 1e-2
    MultimodalLM.from_pretrained(result.checkpoint)  # the slowed saves are whole


def test_a_machine_that_slows_down_after_the_fit_gets_the_schedule_shortened_in_time(tmp_path, clock, caplog,
                                                                                    monkeypatch):
    # from step 26 each step takes 3x as long (another job on the machine): the fit made at step 11 no
    # longer fits, and the refits every 10 steps, reading the latest steps' pace, shorten the schedule
    # so the run still ends its decay within max_minutes (without them it would stop halfway down)
    steps_cost(monkeypatch, clock, lambda n: 0.05 if n <= 25 else 0.15)
    run = run_config(tmp_path, optim={**FITTED, "max_minutes": 0.1})
    with caplog.at_level("INFO", logger="mm_teamlora.train.run"):
        result = train(run)
    ends = fitted_ends(caplog)
    assert ends[0] == 114 and ends == sorted(ends, reverse=True) and ends[-1] == result.total_steps
    assert result.total_steps < 0.6 * 114 and result.finished and last_lr(run) < 0.03 * 1e-2
    assert clock.now <= 6.0


def test_stop_at_val_loss_ends_the_run_finished_at_the_first_validation_that_reaches_it(tmp_path):
    def val_losses(run_dir):
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        return {r["step"]: r["val_loss"] for r in rows if r.get("split") == "val"}

    common = {"val_samples": 2, "eval_steps": 2, "optim": {"max_steps": 6, "schedule": "constant"}}
    full = train(run_config(tmp_path, output_dir=str(tmp_path / "full"), **common))
    curve = val_losses(full.run_dir)
    assert full.finished and sorted(curve) == [2, 4, 6]
    target = curve[4] + 1e-6  # reached at step 4 at the latest, maybe at 2
    expected = min(step for step, loss in curve.items() if loss <= target)

    run = run_config(tmp_path, output_dir=str(tmp_path / "early"), stop_at_val_loss=target, **common)
    early = train(run)
    assert early.finished and early.steps == expected and early.total_steps == 6
    assert val_losses(early.run_dir) == {s: curve[s] for s in curve if s <= expected}  # the same run, cut short
    state = json.load(open(os.path.join(early.checkpoint, "trainer_state.json")))
    assert state["stopped_by"] == "stop_at_val_loss" and state["finished"] and state["step"] == expected
    assert json.load(open(os.path.join(run.output_dir, "run_state.json")))["stopped_by"] == "stop_at_val_loss"
    again = train(run, resume="auto")  # a finished run: nothing trains
    assert again.finished and again.steps == expected and again.tokens_per_s == 0.0


def test_the_lm_head_at_every_position_trains_the_same_run(tmp_path):
    """supervised_logits: false (the head everywhere, then the supervised positions kept) follows
    the default's loss curve, training and validation, to float tolerance."""
    def curve(run_dir, key):
        return [r[key] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if key in r]

    common = {"val_samples": 2, "eval_steps": 2, "optim": {"max_steps": 4, "schedule": "constant"}}
    kept = train(run_config(tmp_path, output_dir=str(tmp_path / "kept"), **common))
    full = train(run_config(tmp_path, output_dir=str(tmp_path / "full"), supervised_logits=False, **common))
    for key in ("loss", "val_loss"):
        assert len(curve(kept.run_dir, key)) >= 2
        assert curve(full.run_dir, key) == pytest.approx(curve(kept.run_dir, key), rel=1e-4)


def _train_in_a_process(path, output_dir, env=None, resume=False):
    command = [sys.executable, "-m", "mm_teamlora.train", str(path), f"output_dir={output_dir}"]
    command += ["--resume", "auto"] if resume else ["--overwrite"]
    return subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600,
                          start_new_session=True)  # the kill hook ends its whole process group


def test_a_run_killed_with_sigkill_resumes_to_the_same_losses_and_tensors(tmp_path):
    """Dropout on, data order seeded, epochs turning over during the run, a DataLoader worker
    fetching ahead of training."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path, adapter={"dropout": 0.1}, save_steps=2, dataloader_workers=1,
                                               optim={"max_steps": 6, "warmup_ratio": 0.3})))
    full = _train_in_a_process(path, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _train_in_a_process(path, tmp_path / "killed", env={"MM_TEAMLORA_TEST_KILL_AT_STEP": "3"})
    assert killed.returncode == -9
    assert [os.path.basename(c) for c in checkpoints(tmp_path / "killed")] == ["checkpoint-000002"]
    resumed = _train_in_a_process(path, tmp_path / "killed", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2 of 6" in resumed.stderr

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / run / "metrics.jsonl")) if "loss" in r]

    # the same float32 operations in the same order: equal to the last bit (tolerance 0)
    assert losses("killed") == losses("full") and len(losses("full")) == 6
    # the killed sitting's steps up to its save count in the run's time and tokens, though it
    # ended before it could say so: the checkpoint it left carried them to the next sitting
    full_state, killed_state = (json.load(open(tmp_path / run / "run_state.json")) for run in ("full", "killed"))
    assert killed_state["run_tokens"] == full_state["run_tokens"] == full_state["sitting_tokens"] > 0
    assert killed_state["sitting_tokens"] < killed_state["run_tokens"]
    assert killed_state["run_seconds"] > killed_state["sitting_seconds"] > 0
    a = MultimodalLM.from_pretrained(str(tmp_path / "full" / "checkpoint-000006")).checkpoint_state_dict()
    b = MultimodalLM.from_pretrained(str(tmp_path / "killed" / "checkpoint-000006")).checkpoint_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- export -----------------------------------------------------------------------------------
def test_export_copy_merge_and_peft_round_trip(tmp_path):
    from mm_teamlora.train.export import export_checkpoint
    from model_helpers import make_batch

    result = train(run_config(tmp_path, adapter={"method": "lora"}, optim={"max_steps": 2}))
    trained = MultimodalLM.from_pretrained(result.checkpoint).eval()
    ids, mask, pixels, counts = make_batch(trained, ["Describe <image> briefly.", "Text only?"], [[1], []])
    with torch.no_grad():
        expected = trained(ids, mask, None, pixels, counts).logits
    copy = export_checkpoint(result.checkpoint, str(tmp_path / "copy"))
    assert "trainer_state" not in os.listdir(copy)
    merged = export_checkpoint(result.checkpoint, str(tmp_path / "merged"), mode="merge")
    os.rename(merged, tmp_path / "moved")  # the merged LM is named relative to its folder
    for folder in (copy, str(tmp_path / "moved")):
        with torch.no_grad():
            got = MultimodalLM.from_pretrained(folder).eval()(ids, mask, None, pixels, counts).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not adapter_layers(MultimodalLM.from_pretrained(str(tmp_path / "moved")).language_model)
    peft_dir = export_checkpoint(result.checkpoint, str(tmp_path / "peft"), mode="peft")
    from peft import PeftModel

    base = MultimodalLM.from_config(trained.config)
    base.language_model = PeftModel.from_pretrained(base.language_model, peft_dir).eval()
    from safetensors.torch import load_file

    base.projector.load_state_dict(load_file(os.path.join(peft_dir, "projector.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(ids, mask, None, pixels, counts).logits, expected, rtol=1e-4,
                                   atol=1e-5)
    routed = train(run_config(tmp_path / "routed", optim={"max_steps": 1}))
    with pytest.raises(ValueError, match="cannot merge teamlora exactly"):
        export_checkpoint(routed.checkpoint, str(tmp_path / "refused"), mode="merge")
    assert not os.path.exists(tmp_path / "refused")
    with pytest.raises(FileExistsError):
        export_checkpoint(result.checkpoint, copy)


def test_the_cli_trains_with_overrides_after_flags_and_exports(tmp_path, capsys):
    from mm_teamlora.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path)))
    assert main(["train", str(path), "--overwrite", "optim.max_steps=1", f"output_dir={tmp_path / 'cli'}"]) == 0
    assert "finished after 1 of 1 steps" in capsys.readouterr().out
    assert main(["train", str(path), "optim.lr=fast"]) == 2
    assert "optim.lr: must be a number, got 'fast'" in capsys.readouterr().err
    folder = str(tmp_path / "cli" / "checkpoint-000001")
    assert main(["export", folder, "--out", str(tmp_path / "merged"), "--merge"]) == 2
    assert "cannot merge teamlora exactly" in capsys.readouterr().err
    assert main(["export", folder, "--out", str(tmp_path / "copy")]) == 0
    assert MultimodalLM.from_pretrained(str(tmp_path / "copy")).config.image_token_count == 16
