"""Mixture configs (strict keys, relative paths, round trip), sampling, determinism, the cache."""

import glob
import json
import logging
import os
import time

import pytest
import yaml

from fixtures.data.helpers import REPO, build, config, llava, rows, write_json
from mm_teamlora.data import ConfigError, ConversationTemplate, MixtureConfig, format_report
from mm_teamlora.data import prepare as prepare_module


def _sources(tmp_path, sizes):
    out = []
    for name, size in sizes.items():
        out.append({"name": name, "path": write_json(tmp_path / f"{name}.json",
                                                    [llava(f"{name}-{i}", answer=f"Answer {i}.") for i in range(size)])})
    return out


def _counts(mixture):
    return {r.name: r.sampled for r in mixture.reports}


def test_repeat_counts(tmp_path):
    sources = _sources(tmp_path, {"a": 10, "b": 6, "c": 4})
    sources[0]["repeat"], sources[1]["repeat"] = 2, 0.5
    mixture = build(config(sources))
    assert _counts(mixture) == {"a": 20, "b": 3, "c": 4} and len(mixture) == 27
    ids = [r["id"] for r in rows(mixture)]
    assert all(ids.count(f"a-{i}") == 2 for i in range(10))
    assert len({i for i in ids if i.startswith("b-")}) == 3  # without replacement


def test_weights_default_uses_no_source_twice(tmp_path):
    sources = _sources(tmp_path, {"a": 10, "b": 4})
    sources[0]["weight"], sources[1]["weight"] = 1, 1
    mixture = build(config(sources))
    assert _counts(mixture) == {"a": 4, "b": 4}
    sources[0]["weight"] = 3
    assert _counts(build(config(sources))) == {"a": 10, "b": 3}  # a is exhausted first: 10 / 0.75 = 13


def test_weights_with_num_samples_upsample_whole_passes_first(tmp_path):
    sources = _sources(tmp_path, {"a": 10, "b": 4})
    sources[0]["weight"], sources[1]["weight"] = 1, 1
    mixture = build(config(sources, num_samples=20))
    assert _counts(mixture) == {"a": 10, "b": 10}
    b_ids = [r["id"] for r in rows(mixture) if r["id"].startswith("b-")]
    assert sorted(b_ids.count(f"b-{i}") for i in range(4)) == [2, 2, 3, 3]


def test_order_is_seeded_and_deterministic(tmp_path):
    sources = _sources(tmp_path, {"a": 12, "b": 8})
    sources[1]["repeat"] = 0.5
    first = [r["id"] for r in rows(build(config(sources, seed=3)))]
    again = [r["id"] for r in rows(build(config(sources, seed=3)))]
    other = [r["id"] for r in rows(build(config(sources, seed=4)))]
    assert first == again and first != other
    assert sorted(first) != first  # shuffled across sources
    unshuffled = [r["id"] for r in rows(build(config(sources, seed=3, shuffle=False)))]
    assert unshuffled[:12] == [f"a-{i}" for i in range(12)]


def test_counts_are_logged_before_and_after_sampling(tmp_path, caplog):
    sources = _sources(tmp_path, {"a": 5, "b": 2})
    sources[0]["repeat"] = 0.4
    write_json(tmp_path / "b.json", [llava("b-0"), llava("b-0"), ["bad"]])
    with caplog.at_level(logging.INFO, logger="mm_teamlora.data.mixture"):
        mixture = build(config(sources, on_error="skip"), report_dir=str(tmp_path / "run"))
    out = format_report(mixture.reports, title="mixture 'mixture'")
    assert out in caplog.text
    assert "source" in out and "read" in out and "kept" in out and "sampled" in out
    line_a = next(line for line in out.splitlines() if line.strip().startswith("a "))
    assert line_a.split()[1:5] == ["5", "0", "5", "2"]
    assert "skipped  b: duplicate_id: 1" in out and "skipped  b: not_an_object: 1" in out
    report = json.load(open(tmp_path / "run" / "data_report.json"))
    assert report["total"] == 3
    assert report["sources"][1]["skipped"] == {"duplicate_id": 1, "not_an_object": 1}


# config ------------------------------------------------------------------------------------------

def test_yaml_relative_paths_resolve_against_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (tmp_path / "data").mkdir()
    write_json(tmp_path / "data" / "d.json", [llava("x")])
    (folder / "mix.yaml").write_text(yaml.safe_dump({
        "sources": [{"path": "../data/d.json", "image_root": "../data/images"}], "cache_dir": "../cache"}))
    monkeypatch.chdir(tmp_path / "data")  # resolution must not depend on the working directory
    cfg = MixtureConfig.from_yaml(str(folder / "mix.yaml"))
    assert cfg.sources[0].path == str(tmp_path / "data" / "d.json")
    assert cfg.sources[0].image_root == str(tmp_path / "data" / "images")
    assert cfg.cache_dir == str(tmp_path / "cache") and cfg.sources[0].name == "d"


def test_config_round_trips(tmp_path):
    cfg = config([{"path": "/x/a.json", "weight": 2, "max_samples": 5}, {"path": "/x/b.jsonl", "weight": 1}],
                 on_error="skip", seed=7, images={"min_side": 4, "full_decode": True})
    cfg.to_yaml(str(tmp_path / "c.yaml"))
    again = MixtureConfig.from_yaml(str(tmp_path / "c.yaml"))
    assert again == cfg and MixtureConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("change,message", [
    ({"shufle": True}, "unknown key(s) 'shufle'"),
    ({"sources": [{"path": "a.json", "wieght": 1}]}, "source 0: unknown key(s) 'wieght'"),
    ({"images": {"min_sid": 3}}, "images: unknown key(s) 'min_sid'"),
    ({"sources": [{"path": "a.json", "weight": 0}]}, "weight must be positive"),
    ({"sources": [{"path": "a.json", "weight": -1.5}]}, "weight must be positive"),
    ({"sources": [{"path": "a.json", "repeat": 0}]}, "repeat must be positive"),
    ({"sources": [{"path": "a.json", "weight": "1"}]}, "weight must be int/float/null"),
    ({"sources": [{"path": "a.json", "weight": 1, "repeat": 2}]}, "not both"),
    ({"sources": [{"path": "a.json", "weight": 1}, {"path": "b.json"}]}, "every source or to none"),
    ({"sources": [{"path": "a.json"}], "num_samples": 10}, "num_samples needs weights"),
    ({"sources": [{"path": "a.json"}, {"path": "x/a.json"}]}, "source names must be unique"),
    ({"sources": [{"path": "a.json", "max_samples": 0}]}, "max_samples must be positive"),
    ({"sources": [{"path": "a.json", "format": "csv"}]}, "format must be one of"),
    ({"sources": []}, "non-empty list"),
    ({"sources": [{"image_root": "x"}]}, "no path"),
    ({"on_error": "ignore"}, "on_error must be one of raise, skip"),
    ({"template": "llama"}, "template must be one of"),
    ({"max_length": 0}, "max_length must be positive"),
    ({"shuffle": "yes"}, "shuffle must be bool"),
    ({"images": {"max_aspect_ratio": 0.5}}, "max_aspect_ratio"),
])
def test_config_errors(change, message):
    data = {"sources": [{"path": "a.json"}]}
    data.update(change)
    with pytest.raises(ConfigError) as info:
        MixtureConfig.from_dict(data)
    assert message in str(info.value)


def test_yaml_errors_name_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("sources: [{path: a.json}]\nseeed: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: mixture: unknown key\(s\) 'seeed'"):
        MixtureConfig.from_yaml(str(tmp_path / "bad.yaml"))


def test_shipped_configs_parse():
    paths = sorted(glob.glob(os.path.join(REPO, "data_configs", "*.yaml")))
    assert len(paths) >= 3
    for path in paths:
        cfg = MixtureConfig.from_yaml(path)
        assert all(os.path.isabs(s.path) for s in cfg.sources)
    cfg = MixtureConfig.from_yaml(os.path.join(REPO, "data_configs", "llava_v1_5_665k_text.yaml"))
    assert [s.format for s in cfg.sources] == ["llava", "alpaca"] and cfg.sources[0].path.endswith("llava_v1_5_mix665k.json")


# cache -------------------------------------------------------------------------------------------

def test_second_prepare_is_a_cache_hit(tmp_path, monkeypatch):
    path = write_json(tmp_path / "d.json", [llava(f"r{i}", answer=f"Answer number {i}.") for i in range(300)])
    cfg = config([{"path": path}], cache_dir=str(tmp_path / "cache"))
    first = build(cfg, use_cache=True)
    with monkeypatch.context() as m:  # a hit reads nothing and tokenises nothing
        m.setattr(ConversationTemplate, "encode", lambda *a: pytest.fail("tokenised on a cache hit"))
        m.setattr(prepare_module, "read_records", lambda *a: pytest.fail("read the file on a cache hit"))
        start = time.perf_counter()
        second = build(cfg, use_cache=True)
        assert time.perf_counter() - start < 5
    assert not first.reports[0].cache_hit and second.reports[0].cache_hit
    assert rows(first) == rows(second)
    assert len(os.listdir(tmp_path / "cache")) == 1
    # what the tokens depend on changes the key: a new entry, built again
    cfg.max_length = 100
    assert not build(cfg, use_cache=True).reports[0].cache_hit
    assert build(cfg, use_cache=True, rebuild=True).reports[0].cache_hit is False
    os.utime(path, ns=(0, 0))  # the file changed
    assert not build(cfg, use_cache=True).reports[0].cache_hit
    assert len([d for d in os.listdir(tmp_path / "cache") if not d.startswith(".")]) == 3


def test_cache_keeps_skip_counts(tmp_path):
    path = write_json(tmp_path / "d.json", [llava("a"), ["bad"], llava("a")])
    cfg = config([{"path": path}], cache_dir=str(tmp_path / "cache"), on_error="skip")
    build(cfg, use_cache=True)
    report = build(cfg, use_cache=True).reports[0]
    assert report.cache_hit and report.skipped == {"not_an_object": 1, "duplicate_id": 1} and report.kept == 1
