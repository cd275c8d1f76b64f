"""The torch Dataset, the collator and `check_mixture` (what `mm-teamlora data check` runs)."""

import json
import os

import pytest
import torch

from fixtures.data.helpers import REPO, TOKENS_PER_IMAGE, build, config, llava, make_image, tokenizer, write_json
from mm_teamlora.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from mm_teamlora.data import (ConfigError, DataCollator, DataError, InstructionDataset, MixtureConfig, ResizeToTensor,
                              build_dataset, check_mixture)

FIXTURE_MIX = os.path.join(REPO, "data_configs", "fixtures.yaml")


def _dataset(tmp_path, seed=0):
    make_image(tmp_path / "a.png", (40, 30), color=(255, 0, 0))
    make_image(tmp_path / "b.png", (30, 40), color=(0, 0, 255))
    path = write_json(tmp_path / "d.json", [
        llava("one", question="<image>\nWhat color?", answer="Red.", image="a.png"),
        llava("two", question="<image> and <image>: same?", answer="No, one is red and one is blue.",
              images=["a.png", "b.png"]),
        llava("text", question="Say a long sentence please.", answer="This is a rather long sentence to say."),
    ])
    return InstructionDataset(build(config([{"path": path, "image_root": str(tmp_path)}], seed=seed)), ResizeToTensor(8))


def test_items(tmp_path):
    dataset = _dataset(tmp_path)
    items = {dataset[i]["id"]: dataset[i] for i in range(len(dataset))}
    two, text = items["two"], items["text"]
    assert two["pixel_values"].shape == (2, 3, 8, 8) and two["image_count"] == 2 and two["source"] == "d"
    assert two["pixel_values"][0, 0].mean() == 1.0 and two["pixel_values"][1, 2].mean() == 1.0  # red then blue
    assert text["pixel_values"] is None and text["image_count"] == 0
    assert (two["input_ids"] == IMAGE_PLACEHOLDER_ID).sum() == 2
    order = [dataset[i]["id"] for i in range(len(dataset))]
    lengths = dict(zip(order, dataset.lengths))
    assert lengths["two"] == len(two["input_ids"]) + 2 * (TOKENS_PER_IMAGE - 1)
    assert dict(zip(order, dataset.image_counts)) == {"one": 1, "two": 2, "text": 0}


def test_collator_shapes_padding_and_images(tmp_path):
    dataset = _dataset(tmp_path)
    tok = tokenizer()
    items = [dataset[i] for i in range(len(dataset))]
    batch = DataCollator.from_tokenizer(tok)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, item in enumerate(items):
        n = lengths[row]
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()  # right padding
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert batch["image_counts"].tolist() == [item["image_count"] for item in items]
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    expected = torch.cat([item["pixel_values"] for item in items if item["pixel_values"] is not None])
    assert torch.equal(batch["pixel_values"], expected)
    assert (batch["input_ids"] == IMAGE_PLACEHOLDER_ID).sum() == 3
    padded = DataCollator(tok.pad_token_id, pad_to_multiple_of=16)(items)
    assert padded["input_ids"].shape[1] % 16 == 0
    left = DataCollator.from_tokenizer(tok, padding_side="left")(items)  # for batched generation
    for row, item in enumerate(items):
        n = lengths[row]
        assert torch.equal(left["input_ids"][row, -n:], item["input_ids"])
        assert left["attention_mask"][row, -n:].all() and not left["attention_mask"][row, :-n].any()
    assert torch.equal(left["pixel_values"], batch["pixel_values"])


def test_text_only_batch_has_no_pixel_values(tmp_path):
    dataset = _dataset(tmp_path)
    text = [dataset[i] for i in range(len(dataset)) if dataset[i]["id"] == "text"]
    batch = DataCollator.from_tokenizer(tokenizer())(text)
    assert batch["pixel_values"] is None and batch["image_counts"].tolist() == [0]


def test_loader_is_deterministic_given_the_seed(tmp_path):
    def batches(seed):
        dataset = _dataset(tmp_path, seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=DataCollator.from_tokenizer(tokenizer()))
        return [batch for batch in loader]

    first, again, other = batches(1), batches(1), batches(2)
    for a, b in zip(first, again):
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key])
    assert any(not torch.equal(a["image_counts"], b["image_counts"]) or a["input_ids"].shape != b["input_ids"].shape
               for a, b in zip(first, other))


def test_collator_rejects_mixed_image_sizes():
    items = [{"input_ids": torch.tensor([1]), "labels": torch.tensor([1]), "pixel_values": torch.zeros(1, 3, 4, 4),
              "image_count": 1},
             {"input_ids": torch.tensor([1]), "labels": torch.tensor([1]), "pixel_values": torch.zeros(1, 3, 8, 8),
              "image_count": 1}]
    with pytest.raises(ValueError, match="different shapes"):
        DataCollator(0)(items)


def test_image_changed_after_the_check_names_the_file(tmp_path):
    dataset = _dataset(tmp_path)
    (tmp_path / "b.png").write_bytes(b"gone bad")
    index = [dataset.mixture.sources[s].data[int(r)]["id"] for s, r in dataset.mixture.order].index("two")
    with pytest.raises(DataError, match=r"b.png changed after it was checked"):
        dataset[index]


def test_build_dataset_takes_the_models_image_token_count(tmp_path):
    config = MixtureConfig.from_yaml(FIXTURE_MIX)
    config.image_token_count = None  # the mixture leaves it to the model
    dataset = build_dataset(config, tokenizer(), ResizeToTensor(8), image_token_count=4,
                            cache_dir=str(tmp_path))
    assert dataset.mixture.config.image_token_count == 4 and config.image_token_count is None  # not changed
    index = list(dataset.image_counts).index(2)
    assert dataset.lengths[index] == len(dataset[index]["input_ids"]) + 2 * (4 - 1)


def test_a_mixture_that_disagrees_with_the_model_fails_clearly(tmp_path):
    with pytest.raises(ConfigError, match="says image_token_count: 16 but the model gives 4"):
        build_dataset(FIXTURE_MIX, tokenizer(), ResizeToTensor(8), image_token_count=4, cache_dir=str(tmp_path))
    config = MixtureConfig.from_yaml(FIXTURE_MIX)
    config.image_token_count = None
    with pytest.raises(ConfigError, match="has images .* image_token_count is unknown"):
        build_dataset(config, tokenizer(), ResizeToTensor(8), cache_dir=str(tmp_path))

    # a text-only mixture needs no image token count (a text-only peer, `data check` without a model)
    text_only = MixtureConfig.from_dict({"tokenizer": "tiny", "sources": [
        {"path": os.path.join(REPO, "tests", "fixtures", "data", "alpaca_small.jsonl"), "format": "alpaca"}]})
    dataset = build_dataset(text_only, tokenizer(), cache_dir=str(tmp_path))
    assert len(dataset) > 0 and list(dataset.lengths) == [len(r["input_ids"]) for r in dataset]


# check_mixture ------------------------------------------------------------------------------------
# (the `data check` command's output and exit codes: test_cli.py)

def test_check_builds_the_mixture_and_collates_a_first_batch(tmp_path):
    config = MixtureConfig.from_yaml(FIXTURE_MIX)
    result = check_mixture(config, tokenizer(), ResizeToTensor(8), cache_dir=str(tmp_path / "cache"),
                           report_dir=str(tmp_path / "run"))
    assert len(result.dataset) == 12 and result.batch["input_ids"].shape[0] == 4
    assert result.summary.startswith("first batch: input_ids (4, ") and "12 samples" in result.summary
    report = json.load(open(tmp_path / "run" / "data_report.json"))
    assert {s["name"]: (s["records"], s["kept"], s["sampled"]) for s in report["sources"]} == \
        {"llava": (4, 4, 8), "alpaca": (3, 3, 3), "messages": (2, 2, 1)}
    again = check_mixture(config, tokenizer(), cache_dir=str(tmp_path / "cache"))
    assert all(r.cache_hit for r in again.mixture.reports)
    with pytest.raises(ConfigError, match="says image_token_count: 16 but the model gives 4"):
        check_mixture(config, tokenizer(), image_token_count=4, cache_dir=str(tmp_path / "cache"))


def test_check_raises_on_a_bad_record_under_raise(tmp_path):
    make_image(tmp_path / "ok.png")
    path = write_json(tmp_path / "d.json", [llava("fine", image="ok.png"), llava("broken", image="missing.png")])
    config = MixtureConfig.from_dict({"image_token_count": 16, "sources": [{"path": path, "image_root": "."}]},
                                     base_dir=str(tmp_path))
    with pytest.raises(DataError, match="id 'broken': image_missing"):
        check_mixture(config, tokenizer(), cache_dir=str(tmp_path / "cache"))
