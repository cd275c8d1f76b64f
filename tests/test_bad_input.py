"""A messy file under `on_error: skip`: every record is loaded or rejected, and every rejected one
is listed in `rejected.jsonl` beside `data_report.json` (file, position, line, id, reason, detail),
also when the source comes from the cache."""

import json

import pytest

from fixtures.data.helpers import build, config, llava, make_image, tokenizer, write_json, write_jsonl
from mm_teamlora.data import DataError


def _records():
    """(JSONL lines, expected rejections as (index, line, id, reason)); blank lines are not records."""
    lines, expected = [], []

    def bad(value, reason, rid):
        expected.append((len([x for x in lines if x != b""]), len(lines) + 1, rid, reason))
        lines.append(value)

    lines.append(llava("ok-0", image="good.png"))
    bad(llava("sur", question="x \ud800"), "invalid_text", "sur")
    lines.append(b"")
    bad(b'{"id": "cut", "conversations": [', "invalid_json", None)
    for i in range(5):  # more of one reason than data_report.json's examples hold
        bad(llava(f"nul-{i}", question=f"q\x00{i}"), "control_characters", f"nul-{i}")
        lines.append(llava(f"ok-{i + 1}"))
    bad(llava("vid", videos=["clip.mp4"]), "unsupported_modality", "vid")
    bad(llava("gone", image="missing.png"), "image_missing", "gone")
    bad(llava("long", answer="word " * 400), "too_long", "long")
    bad([1, 2], "not_an_object", None)
    lines.append(llava("ok-last"))
    return lines, expected


def test_every_record_is_loaded_or_listed_in_rejected_jsonl(tmp_path):
    make_image(tmp_path / "images" / "good.png")
    lines, expected = _records()
    path = write_jsonl(tmp_path / "messy.jsonl", lines)
    source = {"path": path, "name": "messy", "image_root": str(tmp_path / "images")}
    cfg = config([source], on_error="skip", truncation="skip", max_length=256, shuffle=False,
                 cache_dir=str(tmp_path / "cache"))
    for run, cache_hit in (("run1", False), ("run2", True)):
        mixture = build(cfg, use_cache=True, report_dir=str(tmp_path / run))
        report = mixture.reports[0]
        assert report.cache_hit is cache_hit
        inputs = sum(1 for x in lines if x != b"")
        rejected = [json.loads(x) for x in open(tmp_path / run / "rejected.jsonl", encoding="utf-8")]
        assert report.records == inputs and report.kept + len(rejected) == inputs
        assert report.kept == 7 and sum(report.skipped.values()) == len(rejected) == len(expected)
        assert [(r["index"], r["line"], r["id"], r["reason"]) for r in rejected] == expected
        assert all(r["source"] == "messy" and r["file"] == path and r["detail"] for r in rejected)
        assert "'\\ud800'" in rejected[0]["detail"] and "missing.png" in rejected[-3]["detail"]
        data_report = json.load(open(tmp_path / run / "data_report.json"))
        assert len(data_report["sources"][0]["examples"]["control_characters"]) == 3  # the summary stays short
        assert "rejected" not in data_report["sources"][0]


def test_a_clean_mixture_writes_an_empty_rejected_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "clean.jsonl", [llava("a"), llava("b")])
    build(config([{"path": path}]), report_dir=str(tmp_path / "run"))
    assert (tmp_path / "run" / "rejected.jsonl").read_text() == ""


def test_truncated_and_changed_records_are_named_with_their_token_counts(tmp_path):
    make_image(tmp_path / "images" / "a.png")
    long_answer = " ".join(["word"] * 120)
    path = write_jsonl(tmp_path / "long.jsonl", [
        llava("short", question="<image>\nq", image="a.png"),
        llava("cut", question="<image>\nq", answer=long_answer, image="a.png"),
        b"",
        llava("no-placeholder", question="q", image="a.png"),
        llava("cut-too", question="<image>\nq", answer=long_answer, image="a.png"),
        llava("too-long-question", question="<image>\n" + " ".join(["ask"] * 120), image="a.png"),
    ])
    source = {"path": path, "name": "long", "image_root": str(tmp_path / "images")}
    cfg = config([source], max_length=64, shuffle=False, cache_dir=str(tmp_path / "cache"))
    for run in ("run1", "run2"):  # built, then from the cache
        mixture = build(cfg, use_cache=True, report_dir=str(tmp_path / run))
        noted = [json.loads(x) for x in open(tmp_path / run / "notes.jsonl", encoding="utf-8")]
        assert [(n["index"], n["line"], n["id"], n["note"]) for n in noted] == [
            (1, 2, "cut", "truncated"), (2, 4, "no-placeholder", "image_placeholder_prepended"),
            (3, 5, "cut-too", "truncated")]
        assert all(n["file"] == path and n["source"] == "long" for n in noted)
        cut = noted[0]
        assert cut["tokens"] > 64 and cut["kept_tokens"] == 64
        assert f"{cut['tokens']} tokens cut to 64" in cut["detail"]
        # the record dropped for length is in rejected.jsonl, with its tokens
        (dropped,) = [json.loads(x) for x in open(tmp_path / run / "rejected.jsonl", encoding="utf-8")]
        assert (dropped["index"], dropped["id"], dropped["reason"]) == (4, "too-long-question", "no_supervised_tokens")
        assert "tokens cut to" in dropped["detail"]
        source_report = json.load(open(tmp_path / run / "data_report.json"))["sources"][0]
        assert source_report["notes"] == {"image_placeholder_prepended": 1, "truncated": 2}
        assert [e["id"] for e in source_report["note_examples"]["truncated"]] == ["cut", "cut-too"]
        assert "noted" not in source_report
    from mm_teamlora.data import format_report

    assert "truncated: 2 (" in format_report(mixture.reports) and "first: record 1, id 'cut', " in format_report(
        mixture.reports)


# LLaMA-Factory dataset_info.json: written here, in the shapes of that toolkit's data/ folder

def _llamafactory(tmp_path, entries: dict, records=None, file_name="mllm_demo.json"):
    """A LLaMA-Factory data folder: dataset_info.json with `entries`, a ShareGPT `messages` file
    with images under mllm_demo_data/, an alpaca file; returns the dataset_info.json path."""
    data = tmp_path / "lf"
    make_image(data / "mllm_demo_data" / "1.jpg")
    if records is None:
        records = [
            {"messages": [{"role": "user", "content": "<image>Who are they?"},
                          {"role": "assistant", "content": "Two players."},
                          {"role": "user", "content": "What are they doing?"},
                          {"role": "assistant", "content": "Celebrating."}],
             "images": ["mllm_demo_data/1.jpg"]},
            {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]},
        ]
    write_json(data / file_name, records)
    write_json(data / "alpaca_demo.json", [
        {"instruction": "Add", "input": "2 and 3", "output": "5", "history": [["Hi", "Hello."]]},
        {"instruction": "Name a colour", "output": "Red."},
    ])
    return write_json(data / "dataset_info.json", entries)


MLLM_DEMO = {"file_name": "mllm_demo.json", "formatting": "sharegpt",
             "columns": {"messages": "messages", "images": "images"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}


def test_a_llamafactory_dataset_info_entry_is_read_as_that_toolkit_reads_it(tmp_path):
    info = _llamafactory(tmp_path, {"mllm_demo": MLLM_DEMO, "alpaca_demo": {"file_name": "alpaca_demo.json"},
                                    "alpaca_history": {"file_name": "alpaca_demo.json",
                                                       "columns": {"history": "history"}}})
    mixture = build(config([{"path": info, "dataset": name} for name in ("mllm_demo", "alpaca_demo", "alpaca_history")],
                           shuffle=False))
    mllm, alpaca, _ = mixture.reports
    assert (mllm.name, mllm.kept, mllm.records, alpaca.kept) == ("mllm_demo", 2, 2, 2)
    assert mllm.path.endswith("mllm_demo.json") and not mllm.skipped and not alpaca.skipped
    first = mixture.sources[0].data[0]
    assert first["images"] == [str(tmp_path / "lf" / "mllm_demo_data" / "1.jpg")]  # image_root: the info folder
    tok = tokenizer()
    plain, history = (tok.decode([t for t in mixture.sources[i].data[0]["input_ids"] if t >= 0]) for i in (1, 2))
    assert "Add\n2 and 3" in plain and "Hello." not in plain  # LLaMA-Factory's default: no history column
    assert "Hi" in history and "Hello." in history and "Add\n2 and 3" in history


@pytest.mark.parametrize("entry, reason, words", [
    ({"formatting": "sharegpt"}, "dataset_info_invalid", "no file_name"),
    ({**MLLM_DEMO, "formatting": "openai"}, "dataset_info_invalid", "unknown formatting 'openai'"),
    ({k: v for k, v in MLLM_DEMO.items() if k != "formatting"}, "dataset_info_invalid",
     "columns.messages is not a column of formatting 'alpaca' (a sharegpt column: is formatting: sharegpt missing?)"),
    ({**MLLM_DEMO, "colums": {}}, "dataset_info_invalid", "unknown key(s) 'colums'"),
    ({**MLLM_DEMO, "columns": {"messages": "conversations"}}, "dataset_info_invalid",
     "columns.messages is 'conversations', a key no record of"),
    ({**MLLM_DEMO, "tags": {"role_tag": "role", "speaker_tag": "x"}}, "dataset_info_invalid",
     "unknown tag 'speaker_tag'"),
    ({"hf_hub_url": "someone/data"}, "unsupported_dataset", "hf_hub_url 'someone/data': only local files"),
    ({**MLLM_DEMO, "ranking": True}, "unsupported_dataset", "ranking True"),
    ({**MLLM_DEMO, "columns": {"messages": "messages", "videos": "videos"}}, "unsupported_modality", "columns.videos"),
    ({**MLLM_DEMO, "file_name": "mllm_demo.csv"}, "unsupported_dataset", "only .json, .jsonl, .parquet"),
])
def test_a_malformed_dataset_info_entry_names_the_file_the_dataset_and_the_problem(tmp_path, entry, reason, words):
    info = _llamafactory(tmp_path, {"mine": entry})
    for on_error in ("raise", "skip"):  # the entry is wrong, not a record: an error under both policies
        with pytest.raises(DataError) as err:
            build(config([{"path": info, "dataset": "mine"}], on_error=on_error))
        assert err.value.reason == reason and err.value.file == info
        assert "dataset 'mine'" in str(err.value) and words in str(err.value), str(err.value)


def test_a_missing_dataset_key_or_data_file_is_named(tmp_path):
    info = _llamafactory(tmp_path, {"mllm_demo": MLLM_DEMO, "gone": {"file_name": "gone.json"}})
    with pytest.raises(DataError) as err:
        build(config([{"path": info, "dataset": "mlm_demo"}]))
    assert err.value.reason == "dataset_not_found" and "'gone', 'mllm_demo'" in str(err.value)
    with pytest.raises(DataError) as err:
        build(config([{"path": info}]))  # a dataset_info.json with no dataset key
    assert err.value.reason == "dataset_not_found" and "dataset:" in str(err.value)
    with pytest.raises(DataError) as err:
        build(config([{"path": info, "dataset": "gone"}]))
    assert err.value.reason == "file_missing" and err.value.file.endswith("gone.json")
    assert "dataset 'gone'" in str(err.value) and info in str(err.value)


def test_llamafactory_records_fail_one_by_one_with_the_mapping_named(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "function_call", "content": "{}"}]},
        {"conversations": []},
        {"messages": [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "a"}],
         "videos": ["clip.mp4"]},
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
    ]
    info = _llamafactory(tmp_path, {"mine": MLLM_DEMO}, records)
    mixture = build(config([{"path": info, "dataset": "mine"}], on_error="skip", shuffle=False),
                    report_dir=str(tmp_path / "run"))
    report = mixture.reports[0]
    assert report.kept == 2 and report.skipped == {"unknown_role": 1, "missing_conversations": 1,
                                                   "unsupported_modality": 1}
    rejected = [json.loads(x) for x in open(tmp_path / "run" / "rejected.jsonl", encoding="utf-8")]
    assert [r["index"] for r in rejected] == [1, 2, 3]
    assert all(r["file"].endswith("mllm_demo.json") for r in rejected)
    assert "'function_call'" in rejected[0]["detail"] and "columns.messages of dataset 'mine'" in rejected[1]["detail"]


def test_when_every_image_is_missing_the_report_points_at_image_root(tmp_path):
    make_image(tmp_path / "data" / "images" / "coco" / "a.png")
    make_image(tmp_path / "data" / "images" / "coco" / "b.png")
    path = write_jsonl(tmp_path / "data" / "train.jsonl", [
        llava("a", question="<image>\nq", image="coco/a.png"), llava("b", question="<image>\nq", image="coco/b.png"),
        llava("text")])
    wrong = str(tmp_path / "data")  # the images are under data/images
    with pytest.raises(DataError) as err:
        build(config([{"path": path, "image_root": wrong}]))
    message = str(err.value)
    assert err.value.reason == "image_missing" and err.value.record_id == "a"
    assert f"all 2 images of source 'train' are missing under image_root={wrong!r}" in message
    assert f"exists under {str(tmp_path / 'data' / 'images')!r}: is image_root" in message
    mixture = build(config([{"path": path, "image_root": wrong}], on_error="skip"), report_dir=str(tmp_path / "run"))
    report = mixture.reports[0]
    assert report.kept == 1 and report.skipped == {"image_missing": 2} and len(report.hints) == 1
    assert json.load(open(tmp_path / "run" / "data_report.json"))["sources"][0]["hints"] == report.hints
    from mm_teamlora.data import format_report

    assert "hint     train: all 2 images" in format_report(mixture.reports)
    # found from another wrong root too (the data file's folder is searched)
    (hint,) = build(config([{"path": path, "image_root": str(tmp_path / "x")}], on_error="skip")).reports[0].hints
    assert f"exists under {str(tmp_path / 'data' / 'images')!r}" in hint
    # nowhere to be found: the hint still names the root and the paths tried
    lost = write_jsonl(tmp_path / "data" / "lost.jsonl", [llava("c", question="<image>\nq", image="gone/c.png")])
    (hint,) = build(config([{"path": lost, "image_root": wrong}], on_error="skip")).reports[0].hints
    assert "is image_root right?" in hint and repr(str(tmp_path / "data" / "gone" / "c.png")) in hint
    # some images found: no hint, the missing ones are counted as usual
    make_image(tmp_path / "data" / "coco" / "a.png")
    mixture = build(config([{"path": path, "image_root": wrong}], on_error="skip"))
    assert mixture.reports[0].skipped == {"image_missing": 1} and not mixture.reports[0].hints


# writing the prepared data: a cache folder that cannot be written, a full disk

def _source(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [llava("a"), llava("b")])


def test_an_unwritable_cache_folder_falls_back_to_a_temporary_build_and_says_so(tmp_path, monkeypatch, caplog):
    import errno

    from mm_teamlora.data import prepare

    def read_only(folder):
        raise PermissionError(errno.EROFS, "Read-only file system", str(tmp_path / "cache"))

    monkeypatch.setattr(prepare, "atomic_folder", read_only)
    with caplog.at_level("WARNING", logger="mm_teamlora.data.prepare"):
        mixture = build(config([{"path": _source(tmp_path)}], cache_dir=str(tmp_path / "cache")), use_cache=True)
    assert mixture.reports[0].kept == 2 and len(mixture) == 2 and not (tmp_path / "cache").exists()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "cannot write the data cache" in warning and "Read-only file system" in warning
    assert str(tmp_path / "cache") in warning and "building it in a temporary folder" in warning


def test_a_full_disk_is_a_clear_error_naming_the_folder(tmp_path, monkeypatch, capsys):
    import errno

    from mm_teamlora.cli import main
    from mm_teamlora.data import WriteError, prepare

    class FullDisk:
        def __init__(self, path, mode):
            raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(prepare.pa, "OSFile", FullDisk)
    with pytest.raises(WriteError) as err:  # the cache fails, and so does the temporary fallback
        build(config([{"path": _source(tmp_path)}], cache_dir=str(tmp_path / "cache")), use_cache=True)
    message = str(err.value)
    assert "source 'd': cannot write its tokenised data" in message and "No space left on device" in message
    assert "data.arrow" in message and "$TMPDIR" in message
    assert not [p for p in (tmp_path / "cache").iterdir()]  # no half-written entry is left behind
    # `data check` says it in one line, exit 2 (a folder to fix, not a record)
    (tmp_path / "mix.yaml").write_text(f"tokenizer: tiny\ncache_dir: {tmp_path / 'cache'}\n"
                                       "sources: [{path: d.jsonl}]\n")
    assert main(["data", "check", str(tmp_path / "mix.yaml")]) == 2
    out = capsys.readouterr().out
    assert out.startswith("data check: source 'd': cannot write") and "Traceback" not in out


def test_every_reason_and_note_is_documented_in_the_data_configs_readme():
    import os

    from fixtures.data.helpers import REPO
    from mm_teamlora.data import NOTES, REASONS

    text = open(os.path.join(REPO, "data_configs", "README.md"), encoding="utf-8").read()
    assert [code for code in [*REASONS, *NOTES] if f"| `{code}` |" not in text] == []


# the same files under `train`: the run folder lists them, and a bad record under raise is one line

def test_train_lists_rejected_and_changed_records_in_its_run_folder(tmp_path, capsys):
    from mm_teamlora.cli import main

    make_image(tmp_path / "images" / "good.png")
    records = [llava(f"ok-{i}", question="<image>\nq", image="good.png") for i in range(4)]
    records[2:2] = [llava("nul", question="q\x00"), llava("no-placeholder", question="q", image="good.png")]
    write_jsonl(tmp_path / "messy.jsonl", records)
    mixture = {"tokenizer": "tiny", "max_length": 128, "cache_dir": str(tmp_path / "cache"), "on_error": "skip",
               "sources": [{"name": "messy", "path": "messy.jsonl", "image_root": "images"}]}
    write_json(tmp_path / "mix.json", mixture)
    run = {"data": "mix.json", "model": "tiny-random", "output_dir": str(tmp_path / "run"), "val_samples": 0, "tensorboard": False,
           "adapter": {"method": "lora", "r": 4}, "optim": {"micro_batch_size": 2, "max_steps": 1}}
    write_json(tmp_path / "run.json", run)
    assert main(["train", str(tmp_path / "run.json")]) == 0
    (rejected,) = [json.loads(x) for x in open(tmp_path / "run" / "rejected.jsonl", encoding="utf-8")]
    assert (rejected["index"], rejected["line"], rejected["id"], rejected["reason"]) == (2, 3, "nul", "control_characters")
    assert rejected["file"] == str(tmp_path / "messy.jsonl")
    (noted,) = [json.loads(x) for x in open(tmp_path / "run" / "notes.jsonl", encoding="utf-8")]
    assert (noted["id"], noted["note"]) == ("no-placeholder", "image_placeholder_prepended")
    capsys.readouterr()
    # under on_error raise the first bad record stops the run before training: one line, exit 1
    write_json(tmp_path / "mix.json", {**mixture, "on_error": "raise"})
    assert main(["train", str(tmp_path / "run.json"), f"output_dir={tmp_path / 'raised'}"]) == 1
    err = capsys.readouterr().err
    assert "messy.jsonl" in err and "'nul'" in err and "Traceback" not in err
    assert not list((tmp_path / "raised").glob("checkpoint-*"))
