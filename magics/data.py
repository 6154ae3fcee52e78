"""``aifab.data.prepare``: training data for ``%finetune``, prepared in parallel on a dask
cluster.

    result = aifab.data.prepare("raw/*.jsonl", model="/models/llama", out="prepared",
                                seq_len=1024, cluster=cluster)
    %finetune /models/llama prepared --seq-len 1024

Steps, each deterministic, so the output is the same byte for byte with any number of workers
(or none, ``cluster=None``: a single process):

1. **split**: the sources (JSONL files, parquet files; sorted) are cut into chunks of
   ``chunk_records`` lines (JSONL) or into row groups (parquet). Chunks depend on the data only.
2. **tokenize** (one task per chunk): each record is checked; a bad one is counted and reported
   with its file and line (``result.bad``, ``OUT/_bad-records.jsonl``), never dropped silently.
   Chat records (``messages``) are rendered with the model's chat template, ``text`` records
   taken as they are; each document ends with the tokenizer's EOS token.
3. **pack** (one task per output shard): the documents, in source order, are concatenated and
   cut into rows of exactly ``seq_len`` tokens; the last partial row is left out and counted
   (``result.tail_tokens``). Rows are written as parquet shards with an ``input_ids`` column.

The output appears only when complete: it is written next to ``out`` and renamed into place.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from aifab.extension.train_data import DataError, check_record, json_error

SUMMARY_FILE = "_prepare.json"
BAD_FILE = "_bad-records.jsonl"  # "_": parquet readers of the folder skip it
BAD_SHOWN = 5


class PrepareError(ValueError):
    """The sources, model or output cannot be used; nothing was written."""


@dataclass(frozen=True)
class Chunk:
    index: int
    path: str
    kind: str  # jsonl | parquet
    start: int  # first line (JSONL, 1-based) or row group (parquet)
    stop: int  # one past the last


@dataclass
class PrepareResult:
    out: str
    records: int  # good records, tokenized
    bad: int
    bad_examples: list[dict]
    tokens: int
    rows: int
    shards: int
    seq_len: int
    tail_tokens: int
    seconds: float
    workers: int
    files: list[str] = field(default_factory=list)

    @property
    def records_per_second(self) -> float:
        return (self.records + self.bad) / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        lines = [f"prepared {self.records} records into {self.rows} rows of {self.seq_len} "
                 f"tokens ({self.shards} shards) in {self.out} in {self.seconds:.1f} s "
                 f"with {self.workers or 'no'} dask workers"]
        if self.bad:
            lines.append(f"{self.bad} bad records left out (all listed in "
                         f"{Path(self.out) / BAD_FILE}):")
            lines += [f"  {b['file']}:{b['line']}: {b['error']}" for b in self.bad_examples]
        if self.tail_tokens:
            lines.append(f"{self.tail_tokens} tokens at the end did not fill a row")
        return "\n".join(lines)

    _repr_pretty_ = lambda self, p, cycle: p.text(str(self))  # noqa: E731


# ------------------------------------------------------------------------------- sources
def _sources(source) -> list[Path]:
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        p = Path(text)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in (".jsonl", ".parquet"))
        elif any(c in text for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(text))
        else:
            found = [p]
        if not found:
            raise PrepareError(f"{text}: no .jsonl or .parquet files there")
        for f in found:
            if not f.is_file():
                raise PrepareError(f"{f}: no such file")
            if f.suffix not in (".jsonl", ".parquet"):
                raise PrepareError(f"{f}: expected .jsonl or .parquet")
        files += found
    return files


def split(files: list[Path], chunk_records: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            groups = pq.ParquetFile(f).num_row_groups
            chunks += [Chunk(len(chunks) + i, str(f), "parquet", g, g + 1)
                       for i, g in enumerate(range(groups))]
            continue
        with open(f, "rb") as fh:
            lines = sum(1 for _ in fh)
        for start in range(1, lines + 1, chunk_records):
            chunks.append(Chunk(len(chunks), str(f), "jsonl", start,
                                min(start + chunk_records, lines + 1)))
    return chunks


# ------------------------------------------------------------------------------- tasks
@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def _records(chunk: Chunk):
    """(line or row number, record or a parse error) for each record of the chunk."""
    if chunk.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(chunk.path)
        first = sum(pf.metadata.row_group(g).num_rows for g in range(chunk.start))
        for i, rec in enumerate(pf.read_row_group(chunk.start).to_pylist()):
            yield first + i + 1, rec, None
        return
    import itertools

    # newline="\n": lines as split() counted them (a lone \r stays inside its record)
    with open(chunk.path, encoding="utf-8", errors="replace", newline="\n") as fh:
        for lineno, line in enumerate(itertools.islice(fh, chunk.start - 1, chunk.stop - 1),
                                      chunk.start):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield lineno, None, json_error(exc)


def tokenize_chunk(chunk: Chunk, model: str, work: str) -> dict:
    """Check and tokenize one chunk; the documents go to WORK/chunk-N.arrow."""
    import pyarrow as pa

    tok = _tokenizer(model)
    docs, bad = [], []
    for lineno, rec, error in _records(chunk):
        where = f"{chunk.path}:{lineno}"
        try:
            if error:
                raise DataError(f"{where}: {error}")
            kind = check_record(rec, where)
            if kind == "messages":
                text = tok.apply_chat_template(rec["messages"], tokenize=False)
                ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tok(rec["text"])["input_ids"]
        except DataError as exc:
            bad.append({"file": chunk.path, "line": lineno,
                        "error": str(exc).removeprefix(where + ": ")})
            continue
        docs.append(list(ids) + [tok.eos_token_id])
    table = pa.table({"ids": pa.array(docs, type=pa.list_(pa.int32()))})
    with pa.OSFile(str(Path(work) / f"chunk-{chunk.index:06d}.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return {"index": chunk.index, "records": len(docs), "tokens": sum(map(len, docs)),
            "bad": bad}


def pack_shard(shard: int, pieces: list[tuple[int, int, int]], seq_len: int, work: str,
               out: str) -> int:
    """Concatenate token ranges [(chunk, start, stop)] of the stream, cut rows, write a shard."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = []
    for index, start, stop in pieces:
        with pa.memory_map(str(Path(work) / f"chunk-{index:06d}.arrow")) as src:
            ids = pa.ipc.open_file(src).read_all().column("ids").combine_chunks()
            flat = ids.flatten().to_numpy()
        parts.append(flat[start:stop])
    stream = np.concatenate(parts).astype(np.int32)
    rows = stream.reshape(-1, seq_len)
    values = pa.array(rows.reshape(-1))
    offsets = pa.array(np.arange(0, rows.size + 1, seq_len, dtype=np.int32))
    table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets, values)})
    pq.write_table(table, str(Path(out) / f"part-{shard:05d}.parquet"), compression="zstd")
    return len(rows)


def plan_shards(chunk_tokens: list[int], seq_len: int, rows_per_shard: int):
    """Cut the token stream (chunks in order) into shards of whole rows:
    [[(chunk, start, stop), ...] per shard] and the tokens left over at the end."""
    total = sum(chunk_tokens)
    usable = total - total % seq_len
    per_shard = seq_len * rows_per_shard
    shards, bounds, offset = [], [], 0
    for index, n in enumerate(chunk_tokens):
        bounds.append((index, offset, offset + n))
        offset += n
    for lo in range(0, usable, per_shard):
        hi = min(lo + per_shard, usable)
        pieces = [(i, max(lo, a) - a, min(hi, b) - a) for i, a, b in bounds
                  if a < hi and b > lo]
        shards.append(pieces)
    return shards, total - usable


# ------------------------------------------------------------------------------- driver
def prepare(source, model: str, out: str, *, seq_len: int = 1024, cluster=None,
            chunk_records: int = 1000, rows_per_shard: int = 1024,
            overwrite: bool = False, strict: bool = False) -> PrepareResult:
    """Validate, render, tokenize and pack ``source`` into parquet shards in ``out``.

    ``cluster``: an ``aifab.cluster()`` (or any dask cluster or Client) to run on, or None for
    this process. ``strict=True`` refuses data with any bad record (nothing is written).
    """
    t0 = time.monotonic()
    for name, value, low in (("seq_len", seq_len, 8), ("chunk_records", chunk_records, 1),
                             ("rows_per_shard", rows_per_shard, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PrepareError(f"{name}={value!r} must be a whole number >= {low}")
    files = _sources(source)
    model_dir = Path(model).expanduser()
    if not (model_dir / "tokenizer_config.json").is_file():
        raise PrepareError(f"{model}: not a model directory with a tokenizer "
                           "(tokenizer_config.json)")
    model = str(model_dir.resolve())
    final = Path(out).expanduser().resolve()
    for precious in (*(f.resolve() for f in files), Path.cwd().resolve(), Path.home()):
        if precious == final or final in precious.parents:
            raise PrepareError(f"out={str(out)!r} would hold or replace {precious}; choose a "
                               "new folder for the output")
    if final.exists() and any(final.iterdir()):
        if not overwrite:
            raise PrepareError(f"{final} exists and is not empty; choose another out or pass "
                               "overwrite=True")
        if not (final / SUMMARY_FILE).is_file():
            raise PrepareError(f"{final} is not the output of an earlier prepare (no "
                               f"{SUMMARY_FILE}); overwrite=True replaces only such a folder")
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    work = staging / "_work"
    shutil.rmtree(staging, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        chunks = split(files, chunk_records)
        run, workers, done = _runner(cluster)
        try:
            reports = run(tokenize_chunk, chunks, model=model, work=str(work))
            bad = [b for r in reports for b in r["bad"]]
            records = sum(r["records"] for r in reports)
            if strict and bad:
                raise PrepareError(f"{len(bad)} bad records (strict=True), the first: "
                                   f"{bad[0]['file']}:{bad[0]['line']}: {bad[0]['error']}")
            if records == 0:
                raise PrepareError(f"no usable records in {', '.join(map(str, files))}"
                                   + (f" ({len(bad)} bad)" if bad else ""))
            tokens = [r["tokens"] for r in reports]
            shards, tail = plan_shards(tokens, seq_len, rows_per_shard)
            if not shards:
                raise PrepareError(f"only {sum(tokens)} tokens: not one row of "
                                   f"seq_len={seq_len}")
            rows = run(pack_shard, list(enumerate(shards)), seq_len=seq_len, work=str(work),
                       out=str(staging), star=True)
        finally:
            done()
        shutil.rmtree(work)
        with open(staging / BAD_FILE, "w") as fh:
            fh.writelines(json.dumps(b) + "\n" for b in bad)
        result = PrepareResult(
            out=str(final), records=records, bad=len(bad), bad_examples=bad[:BAD_SHOWN],
            tokens=sum(tokens), rows=sum(rows), shards=len(shards), seq_len=seq_len,
            tail_tokens=tail, seconds=0.0, workers=workers, files=[str(f) for f in files])
        (staging / SUMMARY_FILE).write_text(json.dumps({
            "model": model, "seq_len": seq_len, "records": records, "bad": len(bad),
            "tokens": result.tokens, "rows": result.rows, "tail_tokens": tail,
            "chunk_records": chunk_records, "rows_per_shard": rows_per_shard,
            "sources": result.files}, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.seconds = time.monotonic() - t0
    return result


def _runner(cluster):
    """(map over tasks with results in task order, number of workers, clean-up)."""
    if cluster is None:
        def run_here(fn, items, star=False, **kw):
            return [fn(*item, **kw) if star else fn(item, **kw) for item in items]

        return run_here, 0, lambda: None
    from distributed import Client

    own = not isinstance(cluster, Client)
    client = Client(cluster, set_as_default=False) if own else cluster
    workers = len(client.scheduler_info().get("workers", {}))
    if workers == 0:
        if own:
            client.close()
        raise PrepareError("the cluster has no workers: scale it first (cluster.scale(2)) or "
                           "pass cluster=None to prepare in this process")

    def run_on_cluster(fn, items, star=False, **kw):
        futures = [client.submit(fn, *item, **kw, pure=False) if star
                   else client.submit(fn, item, **kw, pure=False) for item in items]
        return client.gather(futures)

    return run_on_cluster, workers, (client.close if own else lambda: None)
