"""The frozen vision tower's on-disk feature cache (train/feature_cache.py, `feature_cache` in the
run config): the same loss and gradients as the tower itself, hits instead of tower calls, misses
for a changed file or another tower, whole entries under concurrent writers, and a whole run that
trains the same with it on."""

import multiprocessing
import os

import pytest
import torch

from fixtures.data.helpers import make_image
from model_helpers import make_batch
from mm_teamlora.adapters import AdapterConfig
from mm_teamlora.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from mm_teamlora.data import load_image
from mm_teamlora.model import MultimodalConfig, MultimodalLM
from mm_teamlora.train import RunConfig, RunConfigError
from mm_teamlora.train.feature_cache import FeatureCache, Lookup, from_run, pixel_digest, tower_fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "data_configs", "fixtures.yaml")
TEXTS = ["<image> What is it?", "Two: <image> and <image>.", "No image here, just text."]


def tiny(seed=0, **vision) -> MultimodalLM:
    model = MultimodalLM.from_config(MultimodalConfig.preset("tiny-random", vision=vision or None, seed=seed))
    model.add_adapters(AdapterConfig(method="teamlora", r=8, num_experts=4, dropout=0.0, seed=3))
    for name, p in model.named_parameters():  # B = 0 would leave A and the routers without a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def labelled(model, image_seeds, texts=None):
    ids, mask, pixels, counts = make_batch(model, texts or TEXTS[:len(image_seeds)], image_seeds)
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_PLACEHOLDER_ID), IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels,
            "image_counts": counts}


class TowerCalls:
    """Images the vision tower ran on, one entry per call."""

    def __init__(self, model):
        self.calls = []
        model.vision_tower.register_forward_hook(lambda m, args, out: self.calls.append(args[0].shape[0]))


def loss_and_grads(model, batch, tower_features=None):
    model.zero_grad(set_to_none=True)
    out = model(**batch, supervised_only=True, tower_features=tower_features)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def test_cached_features_give_the_uncached_loss_and_gradients_and_skip_the_tower(tmp_path):
    model = tiny()
    batch = labelled(model, [[1], [2, 3], []])
    tower = TowerCalls(model)
    plain, plain_grads = loss_and_grads(model, batch)
    assert tower.calls == [3]
    assert plain.tower_features is None  # only asked for with tower_features
    assert all(float(g.abs().max()) > 0 for n, g in plain_grads.items() if n.startswith("projector."))

    cache = FeatureCache(str(tmp_path), model.vision_tower)
    first = cache.lookup(batch["pixel_values"])  # epoch 1: every image misses, the tower runs on all
    assert first.missing == [0, 1, 2] and (cache.hits, cache.misses) == (0, 3)
    out, grads = loss_and_grads(model, batch, first.features)
    cache.store(first, out.tower_features)
    assert tower.calls == [3, 3]
    assert torch.equal(out.loss_sum, plain.loss_sum) and all(torch.equal(grads[n], plain_grads[n]) for n in grads)

    second = cache.lookup(batch["pixel_values"])  # epoch 2: every image hits, the tower does not run
    assert second.missing == [] and (cache.hits, cache.misses) == (3, 3)
    out, grads = loss_and_grads(model, batch, second.features)
    assert tower.calls == [3, 3] and out.tower_features is None
    assert torch.equal(out.loss_sum, plain.loss_sum)
    assert all(torch.equal(grads[n], plain_grads[n]) for n in grads)  # projector, adapters, routers: exact

    # a batch with one stored and one new image: the tower runs on the new one alone
    mixed = labelled(model, [[2], [9, 1]])
    uncached, uncached_grads = loss_and_grads(model, mixed)
    lookup = cache.lookup(mixed["pixel_values"])
    assert lookup.missing == [1]
    out, grads = loss_and_grads(model, mixed, lookup.features)
    assert tower.calls[-1] == 1 and out.tower_features.shape[0] == 1
    cache.store(lookup, out.tower_features)
    torch.testing.assert_close(out.loss_sum, uncached.loss_sum, rtol=1e-6, atol=0)  # the tower on 1 image, not 3
    # The tower on 1 image and on 3 rounds differently (~2e-7), and this random model's gradients
    # amplify that ~1000x (the same happens with no cache at all), so they agree to 1e-3 of each
    # tensor's largest entry (images in the wrong order: off by more than that entry).
    for n in grads:
        scale = float(uncached_grads[n].abs().max())
        torch.testing.assert_close(grads[n], uncached_grads[n], rtol=0, atol=1e-3 * scale + 1e-7)
    assert cache.lookup(mixed["pixel_values"]).missing == []


def test_with_vision_on_every_batch_the_tower_runs_once_per_forward_cache_or_not(tmp_path):
    """Under ZeRO-3 the tower's weights are gathered around its forward: every rank must run it on
    every micro-step, so a batch whose images all hit runs it on the blank image."""
    model = tiny()
    model.vision_on_every_batch = True
    tower = TowerCalls(model)
    cache = FeatureCache(str(tmp_path), model.vision_tower)
    batch = labelled(model, [[1], [2, 3]])
    for _ in range(2):  # miss, then hit
        lookup = cache.lookup(batch["pixel_values"])
        out, _ = loss_and_grads(model, batch, lookup.features)
        cache.store(lookup, out.tower_features)
    text = labelled(model, [[], []], ["Only text.", "More text, no image."])
    loss_and_grads(model, text)
    assert tower.calls == [3, 1, 1]  # all images, the blank (all hit), the blank (no image)


def test_a_changed_file_another_tower_or_preprocessing_misses(tmp_path):
    model = tiny()
    path = make_image(tmp_path / "img" / "a.png", color=(200, 40, 40))

    def pixels(m):
        return m.vision_tower.preprocess(load_image(path))[None]

    cache = FeatureCache(str(tmp_path / "cache"), model.vision_tower)
    lookup = cache.lookup(pixels(model))
    cache.store(lookup, model.vision_tower(pixels(model)))
    assert cache.lookup(pixels(model)).missing == []
    entry = cache.path(lookup.keys[0])
    assert os.path.isfile(entry) and os.path.isfile(os.path.join(cache.folder, "tower.json"))

    make_image(path, color=(200, 40, 41))  # one channel of every pixel changed by one level
    assert cache.lookup(pixels(model)).missing == [0]
    make_image(path, color=(200, 40, 40))  # the old bytes again: the old entry
    assert cache.lookup(pixels(model)).missing == []

    other_weights = tiny()
    with torch.no_grad():
        next(other_weights.vision_tower.parameters()).add_(1e-3)
    other_pool = tiny(pool_to=4)
    fingerprints = {tower_fingerprint(m.vision_tower) for m in (model, tiny(), other_weights, other_pool)}
    assert len(fingerprints) == 3  # a rebuilt tower is the same; other weights or pooling are not
    assert FeatureCache(str(tmp_path / "cache"), other_weights.vision_tower).lookup(pixels(model)).missing == [0]
    assert tower_fingerprint(model.vision_tower, "cpu") != tower_fingerprint(model.vision_tower, "meta")

    # another image size: other pixels, another key
    from mm_teamlora.data import ResizeToTensor

    image = load_image(path)
    assert pixel_digest(ResizeToTensor(32)(image)) != pixel_digest(ResizeToTensor(30)(image))

    # a damaged entry is a miss (rewritten on store), never an error
    with open(entry, "wb") as f:
        f.write(b"not a safetensors file")
    assert cache.lookup(pixels(model)).missing == [0] and cache.read_errors == 1


def _write_many(root, fingerprint, key, features, barrier, rounds):
    tower = _FakeTower(features.shape)
    cache = FeatureCache(root, tower, fingerprint=fingerprint)
    barrier.wait()
    for _ in range(rounds):
        cache.store(Lookup([key], [None]), features[None])


class _FakeTower:
    def __init__(self, shape):
        self.num_tokens, self.hidden_size = shape
        self.config = None


def test_two_processes_writing_the_same_entry_leave_one_whole_entry(tmp_path):
    features = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    key, fingerprint, root = "ab" + "0" * 62, "f" * 64, str(tmp_path)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    writers = [context.Process(target=_write_many, args=(root, fingerprint, key, features, barrier, 200))
               for _ in range(2)]
    for w in writers:
        w.start()
    reader = FeatureCache(root, _FakeTower(features.shape), fingerprint=fingerprint)
    barrier.wait()
    seen = 0
    while any(w.is_alive() for w in writers):  # a reader meanwhile sees nothing or a whole entry
        got = reader._read(key)
        if got is not None:
            seen += 1
            assert torch.equal(got, features)
    for w in writers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert reader.read_errors == 0 and seen > 0
    folder = os.path.dirname(reader.path(key))
    assert os.listdir(folder) == [f"{key}.safetensors"]  # no temporary file left behind
    assert torch.equal(reader._read(key), features)


def test_the_run_config_switch_validates_and_round_trips(tmp_path):
    base = {"data": FIXTURES, "output_dir": str(tmp_path / "run")}
    assert RunConfig.from_dict(base).feature_cache is False
    for value in (True, str(tmp_path / "features")):
        config = RunConfig.from_dict(base, overrides=[f"feature_cache={value}"])
        assert config.feature_cache == value
        import yaml

        assert RunConfig.from_dict(yaml.safe_load(config.to_yaml())) == config
    for bad in ("3", "[1]", "''"):
        with pytest.raises(RunConfigError, match="feature_cache: must be true, false or a folder"):
            RunConfig.from_dict(base, overrides=[f"feature_cache={bad}"])


def test_the_cache_turns_itself_off_where_features_would_change(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MM_TEAMLORA_CACHE", str(tmp_path / "pkg"))
    model = tiny()
    process = model.vision_tower.preprocess
    with caplog.at_level("INFO"):
        assert from_run(False, model, process, True, "cpu") is None
        assert from_run(True, model, process, False, "cpu") is None

        def augmented(image):
            return process(image) + torch.rand(1)

        assert from_run(True, model, augmented, True, "cpu") is None
        model.vision_tower.encoder.requires_grad_(True)
        assert from_run(True, model, process, True, "cpu") is None
        model.vision_tower.requires_grad_(False)
        cache = from_run(True, model, process, True, "cpu")
    assert cache.folder.startswith(str(tmp_path / "pkg" / "vision_features"))
    text = caplog.text
    for reason in ("off (feature_cache: false)", "off (the training data has no image)", "not deterministic",
                   "the vision tower trains", "vision feature cache: on"):
        assert reason in text


def test_a_run_with_the_cache_trains_as_without_it(tmp_path, monkeypatch, caplog):
    """Three epochs of the fixtures mixture under the DeepSpeed engine (ZeRO-2, one process)."""
    from mm_teamlora.train import train
    from mm_teamlora.train.metrics import read_metrics

    monkeypatch.setenv("MM_TEAMLORA_CACHE", str(tmp_path / "pkg"))
    base = {"data": FIXTURES, "model": "tiny-random",
            "adapter": {"method": "teamlora", "r": 8, "num_experts": 4, "dropout": 0.0},
            "optim": {"lr": 1e-2, "micro_batch_size": 2, "grad_accum": 2, "max_steps": 6}, "deepspeed": 2,
            "log_steps": 1, "tensorboard": False, "val_samples": 1}
    records = {}
    with caplog.at_level("INFO"):
        for name, setting in (("off", False), ("on", str(tmp_path / "features"))):
            run = RunConfig.from_dict({**base, "output_dir": str(tmp_path / name), "feature_cache": setting})
            train(run)
            records[name] = [r for r in read_metrics(os.path.join(run.output_dir, "metrics.jsonl"))]
    steps = {k: [r for r in v if "loss" in r] for k, v in records.items()}
    epochs = [r["epoch"] for r in steps["on"]]  # the stream's position after the step
    assert len(steps["on"]) == 6 and epochs[-1] >= 2
    on = [r["loss"] for r in steps["on"]]
    assert on == pytest.approx([r["loss"] for r in steps["off"]], rel=1e-5)
    val = {k: [r["val_loss"] for r in v if r.get("split") == "val"] for k, v in records.items()}
    assert val["on"] == pytest.approx(val["off"], rel=1e-5)
    counts = [r["feature_cache"] for r in steps["on"]]
    assert "feature_cache" not in steps["off"][0]
    assert sum(c["misses"] for c in counts) > 0  # epoch 0 stores ...
    later = [c for c, before in zip(counts[1:], epochs) if before >= 1]  # steps wholly after epoch 0
    assert sum(c["hits"] for c in later) > 0 and all(c["misses"] == 0 for c in later)  # ... and then only hits
    assert "vision feature cache: off (feature_cache: false)" in caplog.text
    assert "vision feature cache: on" in caplog.text and "into epoch 1;" in caplog.text
    assert f"vision feature cache: {sum(c['hits'] for c in counts)} hits, {sum(c['misses'] for c in counts)} " \
           "misses in this sitting's 6 steps" in caplog.text
    folders = os.listdir(tmp_path / "features")
    assert len(folders) == 1 and not os.path.exists(tmp_path / "pkg" / "vision_features")


@pytest.mark.slow
def test_zero3_two_ranks_one_all_hits_one_text_only_stay_in_step(tmp_path):
    """2 CPU ranks under ZeRO-3 with every parameter sharded (tests/test_train_distributed.py's
    setup): each step rank 0 holds the one image, from the second step on a cache hit, and rank 1
    text only. Rank 0 must still run the tower (on the blank image); skipping it is a gloo
    "collective mismatch". The losses equal those without the cache."""
    import subprocess
    import sys

    from mm_teamlora.train.metrics import read_metrics
    from test_train_distributed import write_mixed_zero3_run

    env = write_mixed_zero3_run(tmp_path, {"dropout": 0.0}, {})
    records = {}
    for name, setting in (("off", "false"), ("on", str(tmp_path / "features"))):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "mm_teamlora.train", str(tmp_path / "run.yaml"), f"output_dir={tmp_path / name}",
                               f"feature_cache={setting}", "--overwrite"], env=env, capture_output=True, text=True,
                              timeout=300, cwd=REPO, start_new_session=True)
        assert done.returncode == 0, done.stderr[-4000:]
        records[name] = [r for r in read_metrics(str(tmp_path / name / "metrics.jsonl")) if "loss" in r]
    assert [r["feature_cache"] for r in records["on"]] == [{"hits": 0, "misses": 1}] + [{"hits": 1, "misses": 0}] * 3
    assert all(r["tokens_by_group"]["image"] > 0 and r["tokens_by_group"]["text_only"] > 0 for r in records["on"])
    assert [r["loss"] for r in records["on"]] == pytest.approx([r["loss"] for r in records["off"]], rel=1e-6)
