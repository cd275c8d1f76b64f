"""Run a model over an MMBench file: batched, resumable, shardable; then score and report.

Modes:
- `likelihood`: one forward per row (question x rotation); the prediction is the option letter
  whose first answer token (`answers.letter_token_ids`) has the highest log-probability at the
  first answer position, log-softmax over the whole vocabulary. No parsing, so nothing is
  unparsed: the right mode for small models.
- `generate`: greedy decoding of `max_new_tokens`, then `answers.extract_letter`.

Rows are asked sorted by (question, rotation), so a picture's features, computed once by
`ImageFeatureCache`, serve every rotation (and every row that references the same picture).
Prompts are right-padded for `likelihood` (the logit is read at each row's last real position) and
left-padded by the model for `generate`.

Resume: each finished batch is appended to `predictions.jsonl` (flushed) after a first line with
the run's settings (mode, prompt, CircularEval, shard, the data file's SHA-256, the model spec and
a stamp of its folder's files); a rerun with the same settings skips the rows found there (a
half-written last line is dropped), other settings are refused unless `restart`. Shards: `shard`/`num_shards` keep
the questions with `index mod 1e6 mod num_shards == shard` (all rotations of a question stay in one
shard) and write `predictions.shard-K-of-N.{jsonl,tsv}` without a report; `rescore` over all shard
files (`mm-teamlora eval-score --predictions A --predictions B ...`) merges them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..constants import IMAGE_PLACEHOLDER_ID, OPTION_LETTERS
from ..data.errors import REJECTED_FILE, write_rejected
from ..data.templates import ConversationTemplate, sequence_length
from ..padding import pad_ids, pad_token_id
from .answers import extract_letter, letter_token_ids
from .mmbench import ROTATION_STRIDE, MMBenchData, MMBenchQuestion, PromptConfig, encode_question, read_mmbench
from .scoring import letters_from_text, read_predictions, score, write_predictions_tsv, write_report

MODES = ("likelihood", "generate")
LOG_FORMAT = "mm_teamlora.mmbench_predictions/1"


@dataclass
class EvalConfig:
    mode: str = "likelihood"
    circular: bool = False
    batch_size: int = 8
    max_new_tokens: int = 32  # generate mode
    prompt: PromptConfig = field(default_factory=PromptConfig)
    on_error: str = "raise"  # malformed TSV rows: raise | skip
    shard: int = 0
    num_shards: int = 1
    image_cache_size: int = 64  # pictures whose features are kept
    limit: int = 0  # ask only the N questions of lowest index (all their rotations); 0: all

    def validate(self) -> "EvalConfig":
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.image_cache_size < 1:
            raise ValueError("batch_size, max_new_tokens and image_cache_size must be positive")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0 (0: every question), got {self.limit}")
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"need 0 <= shard < num_shards, got shard {self.shard} of {self.num_shards}")
        return self


@dataclass
class EvalResult:
    predictions: str  # predictions TSV
    log: str  # predictions JSONL (the resume log)
    report: dict | None  # None for a shard of a sharded run
    rows: int  # rows of this run (shard)
    rows_run: int  # rows answered by this call (the rest were resumed)
    images_encoded: int  # pictures run through the vision tower by this call


class ImageFeatureCache:
    """Projected features per picture key, computed once (in one `encode_images` call per batch of
    new keys) and kept for the last `size` keys used."""

    def __init__(self, model, data: MMBenchData, size: int = 64):
        self.model, self.data, self.size = model, data, size
        self.cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.computed = 0

    def features(self, keys: list[int]) -> torch.Tensor:
        new = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if new:
            device = next(self.model.parameters()).device
            pixels = torch.stack([self.model.vision_tower.preprocess(self.data.image(k)) for k in new]).to(device)
            for key, feature in zip(new, self.model.encode_images(pixels)):
                self.cache[key] = feature
            self.computed += len(new)
        for key in keys:
            self.cache.move_to_end(key)
        out = torch.stack([self.cache[k] for k in keys])
        while len(self.cache) > max(self.size, len(set(keys))):
            self.cache.popitem(last=False)
        return out


@torch.no_grad()
def score_letters(model, prompts: list[list[int]], features: torch.Tensor | None,
                  letter_ids: list[int]) -> torch.Tensor:
    """(rows, letters) log-probabilities of each letter's token at the first answer position."""
    device = next(model.parameters()).device
    ids, mask = pad_ids(prompts, pad_token_id(model.tokenizer, default=0), device=device)
    counts = (ids == IMAGE_PLACEHOLDER_ID).logical_and(mask.bool()).sum(1)
    last = torch.tensor([sequence_length(p, model.image_token_count) - 1 for p in prompts], device=device)
    rows = torch.arange(len(prompts), device=device)
    if "logits_to_keep" in inspect.signature(model.language_model.forward).parameters:
        positions, which = torch.unique(last, return_inverse=True)
        logits = model(ids, mask, image_counts=counts, image_features=features, logits_to_keep=positions).logits
        picked = logits[rows, which]
    else:
        picked = model(ids, mask, image_counts=counts, image_features=features).logits[rows, last]
    return picked.float().log_softmax(-1)[:, torch.tensor(letter_ids, device=device)].cpu()


@torch.no_grad()
def generate_texts(model, prompts: list[list[int]], features: torch.Tensor | None, max_new_tokens: int) -> list[str]:
    """Greedy answers (new text only, special tokens dropped)."""
    device = next(model.parameters()).device
    ids, mask = pad_ids(prompts, pad_token_id(model.tokenizer, default=0), device=device)
    counts = (ids == IMAGE_PLACEHOLDER_ID).logical_and(mask.bool()).sum(1)
    new = model.generate(ids, mask, image_counts=counts, image_features=features, max_new_tokens=max_new_tokens,
                         do_sample=False)
    return [model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def _open_log(path: str, meta: dict, restart: bool) -> dict[int, dict]:
    """Finished records of an earlier run with the same settings; creates the log when new."""
    data = b""
    if os.path.exists(path) and not restart:
        with open(path, "rb") as f:
            data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    lines = complete.decode("utf-8").splitlines()
    if not lines:  # new, restarted, or cut before its first line was whole
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"meta": meta}) + "\n")
        return {}
    if len(complete) < len(data):  # a line cut by an interruption
        with open(path, "wb") as f:
            f.write(complete)
    found = json.loads(lines[0]).get("meta")
    if found != meta:
        raise ValueError(f"{path} holds predictions made with other settings ({found}); "
                         f"use another output folder or restart")
    records = (json.loads(line) for line in lines[1:] if line.strip())
    return {r["index"]: r for r in records}


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_stamp(spec: str) -> str | None:
    """Names, sizes and modification times of a model folder's files: a retrained checkpoint
    written to the same folder is not mistaken for the one the log was made with."""
    if not spec or not os.path.isdir(spec):
        return None
    entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(spec) if e.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def evaluate(model, data: MMBenchData | str, out_dir: str, config: EvalConfig | None = None, model_name: str = "",
             restart: bool = False, progress: bool = True) -> EvalResult:
    """Answer every row this shard owns (skipping those already in the log), write predictions
    TSV/JSONL, rejected.jsonl (every row of the file skipped under `on_error: skip`) and, unless
    sharded, report.json and report.md. Returns paths and the report."""
    config = (config or EvalConfig()).validate()
    if isinstance(data, str):
        data = read_mmbench(data, on_error=config.on_error)
    os.makedirs(out_dir, exist_ok=True)
    sharded = config.num_shards > 1
    stem = f"predictions.shard-{config.shard}-of-{config.num_shards}" if sharded else "predictions"
    log_path = os.path.join(out_dir, stem + ".jsonl")
    meta = {"format": LOG_FORMAT, "data": os.path.abspath(data.path), "data_sha256": _file_sha256(data.path),
            "model": model_name, "model_files": _folder_stamp(model_name), "mode": config.mode,
            "circular": config.circular, "prompt": dataclasses.asdict(config.prompt), "shard": config.shard,
            "num_shards": config.num_shards,
            "max_new_tokens": config.max_new_tokens if config.mode == "generate" else None,
            **({"limit": config.limit} if config.limit else {})}
    asked = data.asked(config.circular)
    if config.limit:
        first = set(list(dict.fromkeys(q.group for q in asked))[:config.limit])
        asked = [q for q in asked if q.group in first]
    asked = [q for q in asked if q.group % config.num_shards == config.shard]
    done = _open_log(log_path, meta, restart)
    todo = [q for q in asked if q.index not in done]

    template = ConversationTemplate(config.prompt.template, model.tokenizer, config.prompt.system_prompt)
    letter_ids = letter_token_ids(template, OPTION_LETTERS) if config.mode == "likelihood" else None
    cache = ImageFeatureCache(model, data, config.image_cache_size)
    batches = [todo[i:i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    if progress and batches:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"mmbench {config.mode}", unit="batch")
    was_training = model.training
    model.eval()
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            for batch in batches:
                for record in _answer_batch(model, batch, template, config, letter_ids, cache):
                    done[record["index"]] = record
                    log.write(json.dumps(record) + "\n")
                log.flush()
    finally:
        model.train(was_training)

    raw = {q.index: done[q.index]["prediction"] or done[q.index]["output"] for q in asked if q.index in done}
    letters = {q.index: done[q.index]["prediction"] for q in asked if q.index in done}
    tsv = write_predictions_tsv(os.path.join(out_dir, stem + ".tsv"), asked, raw, letters, data.has_answers)
    write_rejected([data.report], os.path.join(out_dir, REJECTED_FILE))
    report = None
    if not sharded:
        report = {"data": data.path, "model": model_name, "mode": config.mode, **score(asked, letters),
                  **input_counts(data, config.on_error)}
        if config.mode == "likelihood":
            report["letter_token_ids"] = letter_ids
        write_report(out_dir, report)
    return EvalResult(tsv, log_path, report, len(asked), len(todo), cache.computed)


def input_counts(data: MMBenchData, on_error: str) -> dict:
    """What the report says of the file itself: rows read, rows skipped (by reason, each listed in
    `rejected.jsonl` beside the report), questions kept, text-only questions (an empty image cell)."""
    return {"rows_read": data.report.records, "on_error": on_error,
            "skipped_rows": dict(sorted(data.report.skipped.items())), "questions": data.report.kept,
            "text_only_questions": data.text_only, "rejected": REJECTED_FILE}


def _answer_batch(model, batch: list[MMBenchQuestion], template, config: EvalConfig, letter_ids, cache) -> list[dict]:
    prompts = [encode_question(q, template, config.prompt) for q in batch]
    keys = [q.image_key for q in batch if q.image_key is not None]
    features = cache.features(keys) if keys else None
    if config.mode == "likelihood":
        logp = score_letters(model, prompts, features, [letter_ids[c] for c in OPTION_LETTERS])
        records = []
        for q, row in zip(batch, logp):
            scores = {c: float(row[i]) for i, c in enumerate(q.letters)}
            records.append({"index": q.index, "prediction": max(scores, key=scores.get), "output": "",
                            "scores": scores})
        return records
    texts = generate_texts(model, prompts, features, config.max_new_tokens)
    return [{"index": q.index, "prediction": extract_letter(t, dict(zip(q.letters, q.options))), "output": t}
            for q, t in zip(batch, texts)]


def rescore(predictions: list[str], data: MMBenchData | str, out_dir: str, on_error: str = "raise") -> dict:
    """Score existing predictions (TSV and/or JSONL files, e.g. one per shard) against `data`
    without a model; letters are extracted again from each prediction's text. CircularEval is
    scored when some prediction's index is a rotation (>= 1e6). Writes predictions.tsv (merged),
    rejected.jsonl, report.json and report.md."""
    if isinstance(data, str):
        data = read_mmbench(data, on_error=on_error)
    raw = read_predictions(predictions)
    circular = any(index >= ROTATION_STRIDE for index in raw)
    asked = data.asked(circular)
    letters = letters_from_text(asked, raw)
    known = {q.index for q in asked}
    report = {"data": data.path, "predictions": list(predictions), **score(asked, letters),
              "unknown_indices": sum(1 for i in raw if i not in known), **input_counts(data, on_error)}
    os.makedirs(out_dir, exist_ok=True)
    write_rejected([data.report], os.path.join(out_dir, REJECTED_FILE))
    write_predictions_tsv(os.path.join(out_dir, "predictions.tsv"), asked, raw, letters, data.has_answers)
    write_report(out_dir, report, title="MMBench evaluation (rescored)")
    return report
