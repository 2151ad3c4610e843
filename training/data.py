"""Training examples from local files or memory: JSONL, TSV/CSV with a header, or plain text.

Every example is (text, label) with label None for language modelling. Errors name the file
and the line or column at fault.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from sora_serve.errors import AdapterError

Example = tuple[str, int | None]
TEXT_COLUMNS = ("text", "sentence")


def load_examples(source: str | Path | Sequence) -> list[Example]:
    """Examples from a path (.jsonl, .tsv, .csv, anything else = one text per line) or a list."""
    if not isinstance(source, (str, Path)):
        return [_from_memory(item) for item in source]
    path = Path(source)
    if not path.is_file():
        raise AdapterError("data file not found", file=path)
    if path.suffix == ".jsonl":
        examples = _read_jsonl(path)
    elif path.suffix in (".tsv", ".csv"):
        examples = _read_table(path, "\t" if path.suffix == ".tsv" else ",")
    else:
        examples = [(line, None) for line in path.read_text().splitlines() if line.strip()]
    if not examples:
        raise AdapterError("no examples", file=path)
    return examples


def _from_memory(item) -> Example:
    return (item, None) if isinstance(item, str) else (str(item[0]), int(item[1]))


def _label(value, path: Path, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise AdapterError(f"label {value!r} is not an integer", file=path, field=where) from None


def _read_jsonl(path: Path) -> list[Example]:
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AdapterError(f"line {number}: not valid JSON ({exc.msg})", file=path) from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise AdapterError(f"line {number}: expected an object with a string 'text'", file=path, field="text")
        label = record.get("label")
        examples.append((record["text"], None if label is None else _label(label, path, f"line {number} label")))
    return examples


def _read_table(path: Path, delimiter: str) -> list[Example]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        columns = reader.fieldnames or []
        text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if text_column is None:
            raise AdapterError(
                f"no text column: header is {columns}, expected one of {TEXT_COLUMNS}", file=path, field="header"
            )
        has_label = "label" in columns
        return [
            (row[text_column], _label(row["label"], path, f"row {number} label") if has_label else None)
            for number, row in enumerate(reader, start=2)
        ]
