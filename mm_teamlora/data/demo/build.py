"""`mm-teamlora data demo --out DIR`: a small real training mix and a disjoint MMBench-style eval set.

Writes, under `out`:
- `train.json`: LLaVA conversation records (`id`, `image` relative to `out`, `conversations`);
  about a quarter text-only (WordNet), the rest about one image each. Half of each source's
  records are short answers (a word or phrase; LLaVA-1.5's "Answer the question using a single
  word or phrase."), half are multiple-choice prompts answered with a letter, in LLaVA's MMBench
  prompt form: `[hint\\n]question\\nA. ...\\nB. ...\\nC. ...\\nD. ...\\nAnswer with the option's
  letter from the given choices directly.`
- `binding.json`: text-only multiple-choice records whose answer can be read in the prompt: copy
  questions (`Which option is the word "ferry"?` over four training words) and twins of training
  questions whose hint states the answer (`The correct option reads: red`), in the same prompt form. SmolLM2-135M has no
  lettered-choice ability of its own (it answers "A" to everything): these teach it to map the
  right option to its letter where the option is plain to read, so the image and knowledge
  questions then only need the model to find the answer. They are drawn from the training side
  only (after the validation carve), in rotations that balance their letters.
- `images/`: one PNG per distinct training image.
- `val.tsv`: a validation split carved from the training side, in the eval set's layout (`split` =
  `val`): multiple-choice items of every category, held out of `train.json` together with every
  training record that shares their picture or their word. Settings (steps, learning rates,
  mixture) are chosen on it, never on `eval.tsv`.
- `eval.tsv`: MMBench layout (`index, question, hint, A, B, C, D, answer, category, l2-category,
  split, image`), every row four options, `answer` a letter, `split` = `dev`, `image` a base64 PNG;
  text-only rows (WordNet categories) have an empty `image` (`eval_text_only=False` leaves them out).
- `demo.yaml`: a mixture config over `train.json` and `binding.json` that `mm_teamlora.data` accepts;
  `binding.yaml`: one over `binding.json` alone (the main job's first, binding stage).
- `demo_info.json`: counts by source and category, answer-letter counts, asset versions, the
  disjointness report.

Categories (eval `category` -> `l2-category`; training MC records use the same):
| source | category | l2-category | question |
| --- | --- | --- | --- |
| shapes | color | perception | What color is the shape in the image? |
| shapes | shape | perception | Which description matches the shape in the image? (colour + shape) |
| shapes | corners | reasoning | How many corners does the shape in the image have? |
| digits | digit | perception | Which digit is written in the image? |
| digits | digit_arithmetic | reasoning | What is the digit in the image plus k? |
| photos | photo | perception | Which caption best describes the image? |
| wordnet | definition | knowledge | What is the meaning of the word "X"? (text-only) |
| wordnet | hypernym | knowledge | Which word names a broader category that "X" belongs to? (text-only) |

Disjointness is by construction (`splits`: easy-VQA's train vs test split, a seeded digit split,
whole photos split, WordNet lemmas split; evaluation distractors come from the evaluation side) and
is then checked on the written files (`disjoint.check_disjoint`); a violation raises. Answer letters are
assigned round-robin over each split's multiple-choice items, so every category's and every
split's letter counts differ by at most one (checked too). Everything is seeded by `seed`.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import time
from collections import Counter

import numpy as np
from PIL import Image

from ...constants import IMAGE_PLACEHOLDER
from ..config import MixtureConfig
from .assets import DemoAssets, load_assets
from .disjoint import LETTERS, check_disjoint, check_letters_balanced, quoted_terms, write_mmbench_tsv
from .items import L2_CATEGORIES, Item, assign_letters, even_split, item_prompt, largest_remainder
from .splits import SOURCES, SPLITS, Plan

logger = logging.getLogger(__name__)
SHARES = {"shapes": 0.30, "digits": 0.25, "photos": 0.20, "wordnet": 0.25}  # of train and of eval
DEFAULT_TRAIN_SIZE = 3000
DEFAULT_EVAL_SIZE = 300
DEFAULT_VAL_SIZE = 200
DEFAULT_BINDING_SIZE = 800
DEFAULT_COPY_SIZE = 400
COPY_QUESTION = 'Which option is the word "{word}"?'
DATA_VERSION = 2  # 2: binding.json; a demo folder of another version is rebuilt by `mm-teamlora demo`
BINDING_HINT = "The correct option reads: {answer}"  # unquoted: quoted words are what disjointness compares
DEFAULT_OUT = "runs/demo-data"


def _png_bytes(image: str | np.ndarray) -> bytes:
    if isinstance(image, str):
        with open(image, "rb") as f:
            return f.read()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def mixture_yaml(train_json: str, image_root: str, eval_tsv: str, header: str = "",
                 binding_json: str | None = None) -> str:
    """The demo mixture config as YAML text; paths are written as given (relative to the YAML)."""
    binding = "" if binding_json is None else f"""  - name: demo_binding         # text-only lettered choices whose hint states the answer
    path: {binding_json}
    format: llava
"""
    return f"""{header}# The demo training mix (LLaVA JSON, images under image_root) written by `mm-teamlora data demo`.
# Evaluation set (MMBench TSV, disjoint from training by image and by question): {eval_tsv}
# Tokenizer, image processor and tokens per image come from the model that trains on it; check it
# without training as that model sees it:  mm-teamlora data check <this file> --model smollm2-dinov2-small
name: demo
template: chat               # the tokenizer's own chat template
max_length: 512              # counted with the model's tokens per image
seed: 0
on_error: raise
truncation: tail
sources:
  - name: demo_train
    path: {train_json}
    format: llava
    image_root: {image_root}
{binding}images:
  min_side: 8
"""


def binding_mixture_yaml(binding_json: str) -> str:
    """The binding stage's mixture: `binding.json` alone (text-only, no images)."""
    return f"""# The binding stage of the main job: text-only lettered choices whose hint states the answer.
name: demo_binding
template: chat
max_length: 512
seed: 0
on_error: raise
sources:
  - name: demo_binding
    path: {binding_json}
    format: llava
"""


CHECKED_IN_HEADER = """# Checked-in copy pointing at the default output folder (paths relative to data_configs/):
#   mm-teamlora data demo --out runs/demo-data     (run from the repository root first)
#   mm-teamlora data check data_configs/demo.yaml --model smollm2-dinov2-small
# The builder also writes a demo.yaml next to its output, for any --out.
"""


def _prepare_out(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    images = os.path.join(out, "images")
    if os.path.isdir(images) and os.listdir(images):
        if not os.path.isfile(os.path.join(out, "demo_info.json")):
            raise FileExistsError(f"{images} exists and is not from a previous demo build; choose an empty --out")
        shutil.rmtree(images)
    os.makedirs(images, exist_ok=True)


def build_demo_data(out: str = DEFAULT_OUT, seed: int = 0, train_size: int | None = None,
                    eval_size: int | None = None, sources: tuple[str, ...] | list[str] = SOURCES,
                    wordnet_dir: str | None = None, eval_text_only: bool = True,
                    assets: DemoAssets | None = None, val_size: int | None = None,
                    train_rotations: bool = False, binding_size: int | None = None) -> dict:
    """Build the demo training mix and evaluation set under `out` (see the module doc); returns the
    counts and paths (also written to `out/demo_info.json`).

    `train_rotations`: write every multiple-choice training item once per rotation of its options
    (the answer's letter moves with it), so no letter is a shortcut: the CircularEval objective as
    training data. `binding_size`: records in `binding.json` (0: none, and no such source in
    demo.yaml; None: 800 at the default sizes, none when `train_size` is given). `val_size`: multiple-choice items carved from the training side into `val.tsv` (0: none; None:
    200 at the default sizes, none when `train_size` is given).
    `sources`: which assets to use (shares renormalised). `wordnet_dir`: WordNet's database folder
    (default `$WNSEARCHDIR` or `/usr/share/wordnet`). `assets`: already loaded assets (tests pass
    small hand-made ones); otherwise the installed packages are loaded and a missing one raises
    `AssetMissingError` with its install command. Raises `DisjointnessError` when the written
    evaluation set shares an image or a text question with the training set."""
    start = time.time()
    plan = _plan(seed, tuple(sources), train_size, eval_size, eval_text_only)
    if val_size is None:
        val_size = DEFAULT_VAL_SIZE if train_size is None else 0
    if binding_size is None:
        binding_size = DEFAULT_BINDING_SIZE if train_size is None else 0
    if val_size < 0 or binding_size < 0:
        raise ValueError("val_size and binding_size must be >= 0")
    if assets is None:
        assets = load_assets(tuple(plan.n_train), wordnet_dir)
    loaded = time.time()
    train_items, val_items, eval_items = _items(assets, plan, val_size)
    _prepare_out(out)
    if train_rotations:  # consecutive records: the rotations of one question sit side by side
        train_items = [rotated for item in train_items for rotated in rotations(item)]
    binding_items = binding_twins(train_items, binding_size, np.random.default_rng([plan.seed, 97]))
    if binding_items:  # and copy questions, the plainest reading of all: half as many
        binding_items = copy_items(train_items, binding_size // 2, np.random.default_rng([plan.seed, 96])) + binding_items
    train_json, images = _write_train(out, train_items)
    binding_json = _write_train(out, binding_items, "binding.json", "bind")[0] if binding_items else None
    eval_tsv = _write_eval(out, eval_items)
    disjoint = check_disjoint(train_json, eval_tsv, out)
    val_tsv = _write_eval(out, val_items, "val") if val_items else None
    val_disjoint = check_disjoint(train_json, val_tsv, out) if val_tsv else None
    for held_out in filter(None, (eval_tsv, val_tsv)) if binding_json else ():
        check_disjoint(binding_json, held_out, out)  # twins of training questions: raises if not
    letters = _check_letters(train_items, eval_items, val_items)
    config_path = os.path.join(out, "demo.yaml")
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(mixture_yaml("train.json", ".", "eval.tsv", binding_json="binding.json" if binding_json else None))
    MixtureConfig.from_yaml(config_path)  # the data pipeline accepts it
    binding_config = None
    if binding_json:
        binding_config = os.path.join(out, "binding.yaml")
        with open(binding_config, "w", encoding="utf-8") as f:
            f.write(binding_mixture_yaml("binding.json"))
        MixtureConfig.from_yaml(binding_config)
    info = {"version": DATA_VERSION, "out": os.path.abspath(out), "train": train_json, "eval": eval_tsv,
            "val": val_tsv, "binding": binding_json, "config": config_path,
            "binding_config": binding_config, "seed": seed,
            **_counts(train_items, eval_items, images), "binding_records": len(binding_items),
            "binding_letters": dict(sorted(Counter(i.letter for i in binding_items).items())),
            "val_questions": len(val_items),
            "val_by_category": dict(sorted(Counter(i.category for i in val_items).items())),
            "answer_letters": letters, "disjointness": disjoint, "val_disjointness": val_disjoint,
            "assets": dict(assets.versions),
            "seconds": {"load_assets": round(loaded - start, 2), "total": round(time.time() - start, 2)}}
    with open(os.path.join(out, "demo_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    logger.info("%s", format_summary(info))
    return info


def _plan(seed: int, sources: tuple[str, ...], train_size: int | None, eval_size: int | None,
          eval_text_only: bool) -> Plan:
    """Checked arguments -> items per source: the sizes split by `SHARES` (renormalised)."""
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown or not sources:
        raise ValueError(f"sources must be a non-empty subset of {SOURCES}, got {sources}")
    train_size = DEFAULT_TRAIN_SIZE if train_size is None else train_size
    eval_size = DEFAULT_EVAL_SIZE if eval_size is None else eval_size
    if train_size < 1 or eval_size < 1:
        raise ValueError("train_size and eval_size must be positive")
    shares = {s: SHARES[s] for s in SOURCES if s in sources}
    eval_shares = {s: w for s, w in shares.items() if eval_text_only or s != "wordnet"}
    if not eval_shares:
        raise ValueError("eval_text_only=False with sources=('wordnet',) leaves no evaluation questions")
    return Plan(seed, largest_remainder(train_size, shares), largest_remainder(eval_size, eval_shares))


def _items(assets: DemoAssets, plan: Plan, val_size: int) -> tuple[list[Item], list[Item], list[Item]]:
    """Every source's training, validation and evaluation items, letters assigned, each split shuffled."""
    train_items: list[Item] = []
    eval_items: list[Item] = []
    for source in plan.n_train:
        train, evaluation = SPLITS[source](assets, plan)
        train_items += train
        eval_items += evaluation
    train_items, val_items = carve_validation(train_items, val_size, np.random.default_rng([plan.seed, 98]))
    rng = np.random.default_rng([plan.seed, 99])
    assign_letters(train_items, rng)
    assign_letters(eval_items, rng)
    assign_letters(val_items, rng)
    return tuple([items[i] for i in rng.permutation(len(items))] for items in (train_items, val_items, eval_items))


def _held_out_keys(item: Item) -> set[str]:
    """What a held-out item must not share with training: its picture, else its quoted words."""
    return {f"image:{item.image_key}"} if item.image_key else {f"term:{t}" for t in quoted_terms(item.question)}


def carve_validation(items: list[Item], size: int, rng: np.random.Generator) -> tuple[list[Item], list[Item]]:
    """(training, validation): `size` multiple-choice items drawn evenly over the categories,
    and the training items left once every item sharing a held-out picture or word is dropped
    (a validation question about a picture the model trained on would flatter it)."""
    if size == 0:
        return items, []
    mc = [i for i, item in enumerate(items) if item.distractors is not None]
    categories = sorted({items[i].category for i in mc})
    if size > len(mc) // 2:
        raise ValueError(f"val_size {size} would take more than half of the {len(mc)} multiple-choice training items")
    held: list[int] = []
    for category, n in even_split(size, tuple(categories)).items():
        pool = [i for i in mc if items[i].category == category]
        held += sorted(rng.choice(pool, size=min(n, len(pool)), replace=False).tolist())
    held_keys = set().union(*(_held_out_keys(items[i]) for i in held))
    chosen = set(held)
    train = [item for i, item in enumerate(items) if i not in chosen and not _held_out_keys(item) & held_keys]
    return train, [items[i] for i in held]


def rotations(item: Item) -> list[Item]:
    """A multiple-choice item in each rotation of its options (k = 0 first), the letter following
    the answer; a short-answer item alone."""
    if item.distractors is None:
        return [item]
    n = len(item.options)
    out = []
    for k in range(n):
        options = item.options[k:] + item.options[:k]
        out.append(dataclasses.replace(item, options=options, letter=LETTERS[options.index(item.answer)]))
    return out


def binding_twins(items: list[Item], size: int, rng: np.random.Generator) -> list[Item]:
    """`size` text-only twins of multiple-choice training items (drawn evenly over the categories,
    without replacement while they last): the picture dropped, the hint stating the right option's
    text, the options rotated so the twins' letters go round-robin (balanced within one)."""
    mc = [item for item in items if item.distractors is not None]
    if size == 0 or not mc:
        return []
    categories = sorted({item.category for item in mc})
    chosen: list[Item] = []
    for category, n in even_split(size, tuple(categories)).items():
        pool = [item for item in mc if item.category == category]
        picks = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-n // len(pool)))])[:n]
        chosen += [pool[int(k)] for k in picks]
    chosen = [chosen[int(k)] for k in rng.permutation(len(chosen))]
    twins = []
    for n, item in enumerate(chosen):
        rotated = rotations(item)
        twin = next(r for r in rotated if r.letter == LETTERS[n % len(rotated)])
        twins.append(dataclasses.replace(twin, image=None, image_key=None,
                                         hint=BINDING_HINT.format(answer=item.answer)))
    return twins


def copy_items(items: list[Item], size: int, rng: np.random.Generator) -> list[Item]:
    """`size` copy questions over the training side's WordNet words (each asks which of four
    words is a given one; letters round-robin), or none when there are fewer than four words."""
    words = sorted({w for item in items if item.source == "wordnet" for w in re.findall(r'"([^"\n]+)"', item.question)})
    if len(words) < 4:
        return []
    out = []
    for n in range(size):
        chosen = [words[int(k)] for k in rng.choice(len(words), size=4, replace=False)]
        answer, distractors = chosen[0], chosen[1:]
        slot = n % 4
        out.append(Item("wordnet", "copy", COPY_QUESTION.format(word=answer), answer, distractors,
                        options=distractors[:slot] + [answer] + distractors[slot:], letter=LETTERS[slot]))
    return out


def _write_train(out: str, items: list[Item], name: str = "train.json", prefix: str = "demo") -> tuple[str, int]:
    """`name` (train.json) and one PNG per distinct image under images/; returns the path and the image count."""
    written: dict[str, str] = {}
    records = []
    for n, item in enumerate(items):
        kind = "short" if item.distractors is None else item.category
        record = {"id": f"{prefix}-{n:05d}-{item.source}-{kind}"}
        prompt = item_prompt(item)
        if item.image is not None:
            if item.image_key not in written:
                rel = f"images/{item.image_key}.png"
                with open(os.path.join(out, rel), "wb") as f:
                    f.write(_png_bytes(item.image))
                written[item.image_key] = rel
            record["image"] = written[item.image_key]
            prompt = f"{IMAGE_PLACEHOLDER}\n{prompt}"
        answer = item.letter if item.distractors is not None else item.answer
        record["conversations"] = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
        records.append(record)
    path = os.path.join(out, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    return path, len(written)


def _write_eval(out: str, items: list[Item], split: str = "dev") -> str:
    rows = [{"index": n, "question": item.question, "hint": item.hint, **dict(zip(LETTERS, item.options)),
             "answer": item.letter, "category": item.category, "l2-category": L2_CATEGORIES[item.category],
             "split": split,
             "image": base64.b64encode(_png_bytes(item.image)).decode("ascii") if item.image is not None else ""}
            for n, item in enumerate(items)]
    path = os.path.join(out, "eval.tsv" if split == "dev" else f"{split}.tsv")
    write_mmbench_tsv(path, rows)
    return path


def _check_letters(train_items: list[Item], eval_items: list[Item], val_items: list[Item]) -> dict:
    """Answer letters balanced within one, per split and per category of each split; the split counts."""
    train_mc = [i for i in train_items if i.distractors is not None]
    splits = {"train": train_mc, "eval": eval_items, **({"val": val_items} if val_items else {})}
    letters = {split: check_letters_balanced([i.letter for i in items], split) for split, items in splits.items()}
    for split, items in splits.items():
        for category in sorted({i.category for i in items}):
            check_letters_balanced([i.letter for i in items if i.category == category], f"{split} {category}")
    return letters


def _counts(train_items: list[Item], eval_items: list[Item], image_files: int) -> dict:
    def by(items, key):
        return dict(sorted(Counter(key(i) for i in items).items()))

    train_mc = [i for i in train_items if i.distractors is not None]
    return {
        "train_records": len(train_items), "train_text_only": sum(i.image is None for i in train_items),
        "train_short_answer": sum(i.distractors is None for i in train_items),
        "train_multiple_choice": len(train_mc), "train_image_files": image_files,
        "eval_questions": len(eval_items), "eval_text_only": sum(i.image is None for i in eval_items),
        "train_by_source": by(train_items, lambda i: i.source),
        "train_mc_by_category": by(train_mc, lambda i: i.category),
        "eval_by_category": by(eval_items, lambda i: i.category),
        "eval_by_l2_category": by(eval_items, lambda i: L2_CATEGORIES[i.category]),
    }


def format_summary(info: dict) -> str:
    return "\n".join([
        f"demo data in {info['out']} ({info['seconds']['total']:.1f} s)",
        f"  train.json: {info['train_records']} records ({info['train_text_only']} text-only, "
        f"{info['train_short_answer']} short answers, {info['train_multiple_choice']} multiple choice), "
        f"{info['train_image_files']} images; by source {info['train_by_source']}",
        f"  eval.tsv: {info['eval_questions']} questions ({info['eval_text_only']} text-only); "
        f"by category {info['eval_by_category']}",
        *([f"  binding.json: {info['binding_records']} text-only multiple-choice records whose answer can be read "
           f"in the prompt (copy questions, hinted twins); letters {info['binding_letters']}"] if info.get("binding") else []),
        *([f"  val.tsv: {info['val_questions']} questions carved from the training side (choose settings on it); "
           f"by category {info['val_by_category']}"] if info.get("val") else []),
        f"  answer letters: train {info['answer_letters']['train']}, eval {info['answer_letters']['eval']}",
        "  disjoint: {shared_images} shared images, {shared_questions} shared questions, "
        "{shared_terms} shared terms".format(**info["disjointness"]),
        f"  config: {info['config']}",
    ])
