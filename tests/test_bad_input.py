"""A messy file under `on_error: skip`: every record is loaded or rejected, and every rejected one
is listed in `rejected.jsonl` beside `data_report.json` (file, position, line, id, reason, detail),
also when the source comes from the cache."""

import json

from fixtures.data.helpers import build, config, llava, make_image, write_jsonl


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
