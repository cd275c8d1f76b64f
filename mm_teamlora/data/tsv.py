"""Tab-separated files as MMBench tooling and pandas write them (csv quoting), cells of any length.

`csv` refuses cells over 128 KiB by default, less than one base64 picture, and its limit is
process-wide; it is raised here, in the one function that reads TSVs.
"""

from __future__ import annotations

import csv
import sys

FIELD_SIZE_LIMIT = min(sys.maxsize, 2**31 - 1)  # the largest a C long holds on every platform


def read_tsv(path: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(column names, stripped; [(line number where the row ends, row)]) of a TSV file. A byte-order
    mark is dropped; a short row's missing cells are None."""
    csv.field_size_limit(FIELD_SIZE_LIMIT)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        return columns, [(reader.line_num, row) for row in reader]
