"""Training data for %finetune: checked before any process starts, loaded by the trainer.

Accepted: a JSONL file whose records all have ``messages`` (chat, rendered with the model's
chat template) or all have ``text``; a directory saved by ``datasets`` (``save_to_disk``);
parquet files (one, or a directory of shards, e.g. the dask data-prep output) with
``messages``, ``text`` or already tokenized ``input_ids``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = {"system", "user", "assistant", "tool"}
MAX_ERRORS_SHOWN = 5


class DataError(ValueError):
    """Bad training data; the message names the file, the line and what is wrong."""


@dataclass(frozen=True)
class DataSummary:
    path: str
    format: str  # jsonl | datasets | parquet
    field: str  # messages | text | input_ids
    records: int


def json_error(exc: json.JSONDecodeError) -> str:
    # exc.msg may end in "at" ("Unterminated string starting at"): the column goes apart
    return f"not valid JSON: {exc.msg} (column {exc.colno})"


def check_record(rec, where: str) -> str:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                            "{role, content} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES \
                    or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs a role ({', '.join(sorted(ROLES))})"
                                " and a string content")
        return "messages"
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return "text"
    keys = ", ".join(sorted(rec)[:8]) or "none"
    raise DataError(f"{where}: a record needs 'messages' (chat) or 'text'; it has: {keys}")


def inspect_jsonl(path: Path) -> DataSummary:
    field, n = None, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: {json_error(exc)}") from None
            kind = check_record(rec, where)
            if field is None:
                field = kind
            elif kind != field:
                raise DataError(f"{where}: has '{kind}' but earlier records have '{field}'; "
                                "use one kind per file")
            n += 1
    if n == 0:
        raise DataError(f"{path}: no records")
    return DataSummary(str(path), "jsonl", field, n)


def inspect_data(path: str | Path) -> DataSummary:
    """Check the data without loading a model; raises DataError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p.name}: no such file or directory in {p.parent}")
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        return inspect_jsonl(p)
    parquet = [p] if p.suffix == ".parquet" else sorted(p.glob("*.parquet")) if p.is_dir() else []
    if parquet:
        import pyarrow.parquet as pq

        names = set(pq.read_schema(parquet[0]).names)
        field = next((f for f in ("input_ids", "messages", "text") if f in names), None)
        if field is None:
            raise DataError(f"{parquet[0]}: parquet needs a column input_ids, messages or text;"
                            f" it has {', '.join(sorted(names))}")
        rows = sum(pq.read_metadata(f).num_rows for f in parquet)
        return DataSummary(str(p), "parquet", field, rows)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):
        from datasets import load_from_disk

        ds = load_from_disk(str(p))
        field = next((f for f in ("input_ids", "messages", "text") if f in ds.column_names),
                     None)
        if field is None:
            raise DataError(f"{p}: the dataset needs a column input_ids, messages or text")
        return DataSummary(str(p), "datasets", field, len(ds))
    raise DataError(f"{p}: expected a .jsonl file, a parquet file or directory of shards, or a "
                    "directory saved by datasets")


def load_train_dataset(summary: DataSummary):
    """The checked data as a datasets.Dataset (in the trainer process)."""
    import datasets

    if summary.format == "jsonl":
        return datasets.load_dataset("json", data_files=summary.path, split="train")
    if summary.format == "parquet":
        p = Path(summary.path)
        files = [str(p)] if p.is_file() else sorted(str(f) for f in p.glob("*.parquet"))
        return datasets.load_dataset("parquet", data_files=files, split="train")
    return datasets.load_from_disk(summary.path)
