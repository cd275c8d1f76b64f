"""Vanilla and CircularEval accuracy, with chance levels, and the report / predictions files.

A question (a group: all rows with the same `index mod 1e6`) with `n` options, asked in `R` rows
(one per rotation; R = 1 without CircularEval):
- vanilla: correct when its lowest rotation asked (the original order) is answered right;
  chance = 1/n for a uniform guess, reported as the mean of 1/n over the questions.
- circular: correct only when every row of the group is answered right; chance = (1/n)^n (n
  independent uniform guesses), reported as the mean over the questions.
A row without a prediction ("missing") or whose answer names no option ("unparsed") is wrong.
Questions without an answer (test splits) are counted as "unlabelled" and not scored. Under
CircularEval, questions asked in fewer rotations than they have options (copies missing from a
file, or skipped as malformed) are scored on the rows present and counted as "incomplete_groups".
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict

from ..constants import OPTION_LETTERS
from ..files import atomic_write, atomic_write_text
from .answers import extract_letter
from .mmbench import MMBenchQuestion

BUCKETS = (("by_split", "split"), ("by_l2_category", "l2_category"), ("by_category", "category"))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for z = 1.96): with p = k/n,
    centre = (p + z^2/2n) / (1 + z^2/n), half-width = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    Unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at k = 0."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5 / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _bucket(results: list[dict], circular: bool) -> dict:
    n = len(results)
    if n == 0:
        return {"vanilla": None, "circular": None, "n": 0, "chance": None, "chance_circular": None,
                "vanilla_ci95": None, "circular_ci95": None}
    total = lambda key: sum(r[key] for r in results)  # noqa: E731
    return {"vanilla": total("vanilla") / n, "circular": total("circular") / n if circular else None, "n": n,
            "chance": total("chance") / n, "chance_circular": total("chance_circular") / n,
            "vanilla_ci95": list(wilson_interval(round(total("vanilla")), n)),  # lists: as JSON reads them back
            "circular_ci95": list(wilson_interval(round(total("circular")), n)) if circular else None}


def score(asked: list[MMBenchQuestion], predictions: dict[int, str | None]) -> dict:
    """The report for the rows `asked` (all rotations of each question when circular) given
    `predictions` (index -> letter, None when unparsed; absent when missing). Circular accuracy is
    reported when some question was asked in more than one rotation, else None."""
    groups: dict[int, list[MMBenchQuestion]] = defaultdict(list)
    for q in asked:
        groups[q.group].append(q)
    circular = any(len(rows) > 1 for rows in groups.values())
    results, unlabelled, incomplete = [], 0, 0
    for rows in groups.values():
        rows.sort(key=lambda q: q.rotation)
        first = rows[0]
        if first.answer is None:
            unlabelled += 1
            continue
        right = [predictions.get(q.index) == q.answer for q in rows]
        n = len(first.options)
        incomplete += int(circular and len(rows) < n)
        results.append({"vanilla": float(right[0]), "circular": float(all(right)), "chance": 1.0 / n,
                        "chance_circular": (1.0 / n) ** n, "split": first.split, "category": first.category,
                        "l2_category": first.l2_category})
    report = {"overall": _bucket(results, circular)}
    for name, key in BUCKETS:
        keys = sorted({r[key] for r in results})
        report[name] = {k: _bucket([r for r in results if r[key] == k], circular) for k in keys}
    report.update({
        "circular_eval": circular,
        "rows_asked": len(asked),
        "unparsed": sum(1 for q in asked if q.index in predictions and predictions[q.index] is None),
        "missing": sum(1 for q in asked if q.index not in predictions),
        "unlabelled": unlabelled,
        "incomplete_groups": incomplete,  # circular: questions asked in fewer rotations than options
    })
    return report


def letters_from_text(asked: list[MMBenchQuestion], raw: dict[int, str]) -> dict[int, str | None]:
    """Predictions (index -> raw text) to letters with each row's options; indices not asked are dropped."""
    out = {}
    for q in asked:
        if q.index in raw:
            out[q.index] = extract_letter(raw[q.index], dict(zip(q.letters, q.options)))
    return out


def read_predictions(paths: list[str]) -> dict[int, str]:
    """index -> prediction text from predictions TSVs (an `index` and a `prediction` column) and/or
    the runner's JSONL files; several files (e.g. shards) are merged, conflicting duplicates refused."""
    merged: dict[int, str] = {}
    for path in paths:
        for index, text in _read_one(path):
            if index in merged and merged[index] != text:
                raise ValueError(f"{path}: index {index} predicted twice with different answers "
                                 f"({merged[index]!r}, {text!r})")
            merged[index] = text
    return merged


def _read_one(path: str):
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line) if line.strip() else {}
                if "index" in record:
                    yield int(record["index"]), record.get("prediction") or record.get("output") or ""
        return
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not {"index", "prediction"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: a predictions file needs 'index' and 'prediction' columns")
        for row in reader:
            yield int(float(row["index"])), row["prediction"] or ""


def write_predictions_tsv(path: str, asked: list[MMBenchQuestion], raw: dict[int, str],
                          letters: dict[int, str | None], with_answer: bool = True) -> str:
    """MMBench submission columns (index, question, hint, A.., answer, category, l2-category,
    split) plus `prediction`: the letter when one was extracted, else the model's raw text."""
    width = max((len(q.options) for q in asked), default=4)
    header = ["index", "question", "hint", *OPTION_LETTERS[:width], *(["answer"] if with_answer else []),
              "category", "l2-category", "split", "prediction"]

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(header)
            for q in asked:
                if q.index not in raw:
                    continue
                options = list(q.options) + [""] * (width - len(q.options))
                answer = [q.answer or ""] if with_answer else []
                prediction = letters.get(q.index) or raw[q.index]
                writer.writerow([q.index, q.question, q.hint or "", *options, *answer, q.category,
                                 q.l2_category, q.split, prediction])

    atomic_write(path, write)
    return path


def percent(value: float | None, unit: str = "") -> str:
    """An accuracy in [0, 1] as a percentage with one decimal (`-` when there is none)."""
    return "-" if value is None else f"{100 * value:.1f}{unit}"


def summary_line(report: dict) -> str:
    """The overall result in one line: accuracy and chance (vanilla, circular), unparsed, missing."""
    o = report["overall"]
    text = f"n={o['n']}: vanilla {percent(o['vanilla'], '%')} (chance {percent(o['chance'], '%')})"
    if o["circular"] is not None:
        text += f", circular {percent(o['circular'], '%')} (chance {percent(o['chance_circular'], '%')})"
    return text + f"; unparsed {report['unparsed']}, missing {report['missing']}"


def format_markdown(report: dict, title: str = "MMBench evaluation") -> str:
    """report.md: a table per breakdown (accuracy and chance in percent)."""
    lines = [f"# {title}", ""]
    meta = {k: report[k] for k in ("data", "model", "mode") if k in report}
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += [f"- CircularEval: {'yes' if report['circular_eval'] else 'no'}; rows asked: {report['rows_asked']}; "
              f"unparsed: {report['unparsed']}; missing: {report['missing']}; unlabelled questions: "
              f"{report['unlabelled']}"]
    lines += _input_lines(report) + [""]
    head = "| {} | n | vanilla % | chance % | circular % | circular chance % |"
    sections = [("overall", {"overall": report["overall"]})] + [(name, report[name]) for name, _ in BUCKETS]
    for name, rows in sections:
        if not rows:
            continue
        lines += [f"## {name.replace('_', ' ')}", "", head.format("group"), "| --- " * 6 + "|"]
        for key, b in rows.items():
            lines.append(f"| {key or '(none)'} | {b['n']} | {percent(b['vanilla'])} | {percent(b['chance'])} | "
                         f"{percent(b['circular'])} | {percent(b['chance_circular'])} |")
        lines.append("")
    return "\n".join(lines)


def _input_lines(report: dict) -> list[str]:
    """The file's own counts (`runner.input_counts`): rows read, skipped by reason, text-only questions."""
    if "rows_read" not in report:
        return []
    skipped = report.get("skipped_rows") or {}
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
    lines = [f"- rows read: {report['rows_read']}; skipped: {sum(skipped.values())}"
             + (f" ({reasons}; every one listed in `{report.get('rejected', 'rejected.jsonl')}`)" if skipped else "")
             + f"; questions kept: {report['questions']}"]
    lines.append(f"- text-only questions (an empty image cell, asked without a picture): "
                 f"{report['text_only_questions']}")
    return lines


def write_report(out_dir: str, report: dict, title: str = "MMBench evaluation") -> tuple[str, str]:
    """report.json and report.md in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")
    atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
    atomic_write_text(md_path, format_markdown(report, title) + "\n")
    return json_path, md_path
