"""aifab.data.prepare: a few thousand records (JSONL and parquet, with bad ones) prepared in one
process and on 2 dask workers on the real Slurm fixture give the same bytes; bad records are
reported with file and line; the trainer behind %finetune reads the output as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aifab.magics.data import PrepareError, prepare

SEQ_LEN = 128


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i * 7}?"},
                         {"role": "assistant", "content": f"{i} plus {i * 7} is {i * 8}."}]}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, list[tuple[str, int]]]:
    """2 JSONL files (1,200 chat records each) and a parquet file (600 text records in 3 row
    groups), with 5 bad records whose file and line are returned."""
    d = tmp_path_factory.mktemp("raw")
    bad: list[tuple[str, int]] = []
    for f, n in (("a.jsonl", 1200), ("b.jsonl", 1200)):
        lines = [json.dumps(_chat(i + (0 if f == "a.jsonl" else 5000))) for i in range(n)]
        if f == "a.jsonl":
            lines[16] = '{"messages": [ this is not json'
            lines[229] = json.dumps({"messages": [{"role": "user"}]})
            lines[998] = json.dumps({"messages": [{"role": "robot", "content": "beep"}]})
            bad += [(str(d / f), 17), (str(d / f), 230), (str(d / f), 999)]
        else:
            lines[4] = json.dumps({"foo": 1})
            bad.append((str(d / f), 5))
        (d / f).write_text("\n".join(lines) + "\n")
    texts = [f"Record {i} says the number {i * 13} is interesting." for i in range(600)]
    texts[321] = ""
    bad.append((str(d / "c.parquet"), 322))
    pq.write_table(pa.table({"text": texts}), d / "c.parquet", row_group_size=200)
    return d, bad


@pytest.fixture(scope="module")
def single(raw, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "prepared"
    return prepare(raw[0], tiny_model, out, seq_len=SEQ_LEN, chunk_records=250,
                   rows_per_shard=64)


def test_single_process_prepare_reports_bad_records_and_packs_exact_rows(raw, single,
                                                                          tiny_model):
    from transformers import AutoTokenizer

    from aifab.extension.train_data import inspect_data

    src, bad = raw
    assert single.bad == 5 and single.records == 3000 - 5
    reported = [json.loads(line) for line in open(Path(single.out) / "_bad-records.jsonl")]
    assert [(b["file"], b["line"]) for b in reported] == bad
    assert "not valid JSON" in reported[0]["error"]
    assert "messages[0] needs a role" in reported[2]["error"]
    assert f"{src / 'a.jsonl'}:17: not valid JSON" in str(single)

    table = pq.read_table(single.out)
    rows = table.column("input_ids").to_pylist()
    assert len(rows) == single.rows and all(len(r) == SEQ_LEN for r in rows)
    assert single.rows * SEQ_LEN + single.tail_tokens == single.tokens
    assert single.shards == len(list(Path(single.out).glob("part-*.parquet"))) > 1

    # an independent oracle for the first rows: the chat template and EOS, record by record
    tok = AutoTokenizer.from_pretrained(tiny_model)
    stream: list[int] = []
    for line in (src / "a.jsonl").read_text().splitlines()[:16]:
        text = tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // SEQ_LEN
    assert [x for r in rows[:n] for x in r] == stream[:n * SEQ_LEN]

    summary = inspect_data(single.out)  # what %finetune checks before it starts
    assert summary.format == "parquet" and summary.field == "input_ids"
    assert summary.records == single.rows


@pytest.mark.slurm
def test_two_slurm_workers_give_the_single_process_bytes(raw, single, tiny_model, slurm,
                                                         monkeypatch, tmp_path):
    import aifab

    for k, v in {"AIFAB_BACKEND": "slurm", "AIFAB_SLURM_PARTITION": "debug",
                 "AIFAB_DASK_INTERFACE": "lo"}.items():
        monkeypatch.setenv(k, v)
    from aifab.magics.dask_cluster import wait_for_workers

    cluster = aifab.cluster(workers=2, cores=1, memory="2GiB")
    try:
        wait_for_workers(cluster, 2, timeout=90)
        result = prepare(raw[0], tiny_model, tmp_path / "prepared", seq_len=SEQ_LEN,
                         chunk_records=250, rows_per_shard=64, cluster=cluster)
    finally:
        cluster.close()
    assert result.workers == 2
    ours, theirs = Path(result.out), Path(single.out)
    names = sorted(p.name for p in ours.iterdir())
    assert names == sorted(p.name for p in theirs.iterdir())
    for name in names:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


def test_the_trainer_reads_the_prepared_shards(single, tiny_model, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "aifab.extension.trainer", "--model", str(tiny_model),
         "--data", single.out, "--output", str(tmp_path / "ft"), "--max-steps", "3",
         "--seq-len", str(SEQ_LEN)],
        env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    events = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").open()]
    assert [e["step"] for e in events if e.get("event") == "step"] == [1, 2, 3]
    assert next(e for e in events if e.get("event") == "start")["records"] == single.rows


def test_bad_input_is_refused_and_nothing_is_written(raw, tiny_model, tmp_path):
    src, _ = raw
    with pytest.raises(PrepareError, match=r"5 bad records \(strict=True\), the first: "
                                           r".*a.jsonl:17"):
        prepare(src, tiny_model, tmp_path / "strict", seq_len=SEQ_LEN, strict=True)
    assert not (tmp_path / "strict").exists()
    assert not list(tmp_path.glob(".strict.partial-*"))

    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(PrepareError, match="exists and is not empty"):
        prepare(src, tiny_model, used, seq_len=SEQ_LEN)
    assert [p.name for p in used.iterdir()] == ["keep.txt"]

    with pytest.raises(PrepareError, match="would hold or replace"):
        prepare(src, tiny_model, src, seq_len=SEQ_LEN, overwrite=True)  # the sources' folder
    with pytest.raises(PrepareError, match="not the output of an earlier prepare"):
        prepare(src, tiny_model, used, seq_len=SEQ_LEN, overwrite=True)
    assert [p.name for p in used.iterdir()] == ["keep.txt"] and (src / "a.jsonl").is_file()

    with pytest.raises(PrepareError, match="not a model directory"):
        prepare(src, tmp_path, tmp_path / "x")
    with pytest.raises(PrepareError, match="no .jsonl or .parquet files"):
        prepare(tmp_path / "nothing-*.jsonl", tiny_model, tmp_path / "x")
    with pytest.raises(PrepareError, match="seq_len=4 must be a whole number >= 8"):
        prepare(src, tiny_model, tmp_path / "x", seq_len=4)
    with pytest.raises(PrepareError, match="not one row of seq_len=100000"):
        prepare(src / "c.parquet", tiny_model, tmp_path / "x", seq_len=100_000)
    assert not (tmp_path / "x").exists()
