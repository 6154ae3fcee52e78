"""%finetune with real training (TRL + PEFT on the CPU) on the tiny offline model, run by
the session services of a real Jupyter server."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from IPython.core.error import UsageError

from aifab.magics.examples import write_ping_pong
from tests.harness.jupyter import JupyterServer


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory):
    with JupyterServer(tmp_path_factory.mktemp("finetune")) as server:
        yield server


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_ping_pong(tmp_path_factory.mktemp("data") / "ping.jsonl")


@pytest.fixture
def shell(jupyter, ipython_on):
    return ipython_on(jupyter)


def steps(metrics: list[dict]) -> list[dict]:
    return [m for m in metrics if m.get("event") == "step"]


def test_finetune_magic_trains_writes_the_adapter_and_fills_the_widget(shell, tiny_model,
                                                                       data, tmp_path):
    run = shell.run_line_magic(
        "finetune", f"{tiny_model} {data} --name pp --max-steps 60 --lr 1e-3 --seq-len 64 "
                    f"--output {tmp_path}/pp")
    run.wait(300)
    assert run.status == "finished"
    out = Path(run.output)
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    losses = [m["loss"] for m in steps(run.metrics())]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10  # it learned

    widget = run.widget
    deadline = time.monotonic() + 10
    while widget.status != "finished" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert widget.status == "finished"
    assert widget.bar.value == widget.bar.max == 60
    assert len(widget.steps) == 60 and "<polyline" in widget.curve.value
    assert "tokens/s" in widget.stats.value


def test_resume_after_kill_9_matches_an_uninterrupted_run(jupyter, shell, tiny_model, data,
                                                          tmp_path):
    import aifab

    common = dict(max_steps=240, lr=1e-3, seq_len=64, save_steps=20)
    full = aifab.finetune(str(tiny_model), str(data), name="full", output=f"{tmp_path}/full",
                          **common).wait(600)
    run = aifab.finetune(str(tiny_model), str(data), name="cut", output=f"{tmp_path}/cut",
                         **common)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = [m for m in run.metrics() if m.get("event") == "checkpoint"]
        if done and done[-1]["step"] >= 60:
            break
        time.sleep(0.05)
    os.kill(run.info["pid"], signal.SIGKILL)
    jupyter.wait_service("cut", "failed", 30)
    killed_at = steps(run.metrics())[-1]["step"]
    assert killed_at < 240

    with pytest.raises(UsageError, match="--resume to continue it"):
        shell.run_line_magic("finetune", f"{tiny_model} {data} --name cut "
                                         f"--output {tmp_path}/cut --max-steps 240")
    resumed = aifab.finetune(str(tiny_model), str(data), name="cut", output=f"{tmp_path}/cut",
                             resume=True, **common).wait(600)
    start = next(m for m in reversed(resumed.metrics()) if m.get("event") == "start")
    resumed_from = int(start["resume_from"].rsplit("-", 1)[1])
    assert 60 <= resumed_from <= killed_at
    full_loss = {m["step"]: m["loss"] for m in steps(full.metrics())}
    after = [m for m in steps(resumed.metrics()) if m["time"] >= start["time"]]
    assert [m["step"] for m in after] == list(range(resumed_from + 1, 241))  # exact steps
    assert after[-1]["loss"] == pytest.approx(full_loss[240], rel=1e-3, abs=1e-3)
    drift = max(abs(m["loss"] - full_loss[m["step"]]) for m in after)
    assert drift < 1e-2, drift


def test_a_new_kernel_attaches_to_a_running_run(jupyter, tiny_model, data, tmp_path):
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "AIFAB_SERVER_URL": jupyter.url, "AIFAB_SERVER_TOKEN": jupyter.token}
    km, kc = start_new_kernel(kernel_name="aifab", env=env, startup_timeout=120)
    try:
        kc.execute_interactive(
            f"run = %finetune {tiny_model} {data} --name survivor --max-steps 2000 "
            f"--seq-len 64 --output {tmp_path}/survivor", timeout=120)
        jupyter.wait_service("survivor", "starting", 10)
        metrics = tmp_path / "survivor" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
                metrics.exists() and '"event": "step"' in metrics.read_text()):
            time.sleep(0.2)  # training has begun
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=120)
        out = []
        kc.execute_interactive(
            "import time; run = %finetune attach survivor\n"
            "n0 = len(run.metrics()); time.sleep(3); print(run.status, len(run.metrics()) > n0)",
            timeout=120,
            output_hook=lambda m: out.append(m["content"].get("text", ""))
            if m["msg_type"] == "stream" else None)
        assert "".join(out).split() == ["starting", "True"], out  # still running, still going
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        jupyter.request("DELETE", "aifab/api/services/survivor")


@pytest.mark.parametrize("make, message", [
    (lambda d, t: ("/no/such/model", d), "no such model directory"),
    (lambda d, t: ("{model}", _bad_line(t)), "bad.jsonl:3: not valid JSON"),
    (lambda d, t: ("{model}", _neither(t)), "neither.jsonl:2: a record needs 'messages' "
                                           "(chat) or 'text'; it has: prompt"),
    (lambda d, t: ("{model}", d, "--gpus 2"), "2 GPU(s) requested but this session has 0"),
    (lambda d, t: ("{model}", d, f"--output {_used(t)}"), "holds run 'someone-else'"),
])
def test_bad_input_is_refused_before_any_process_starts(shell, jupyter, tiny_model, data,
                                                        tmp_path, make, message):
    parts = [p.replace("{model}", str(tiny_model)) if isinstance(p, str) else str(p)
             for p in make(data, tmp_path)]
    def names():
        return sorted(s["name"] for s in jupyter.get("aifab/api/services").json())

    before = names()
    with pytest.raises(UsageError) as exc:
        shell.run_line_magic("finetune", " ".join(parts) + " --max-steps 5")
    assert message in str(exc.value)
    assert names() == before  # no run was started


def _bad_line(tmp: Path) -> Path:
    p = tmp / "bad.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    return p


def _neither(tmp: Path) -> Path:
    p = tmp / "neither.jsonl"
    p.write_text('{"text": "a"}\n{"prompt": "b"}\n')
    return p


def _used(tmp: Path) -> Path:
    out = tmp / "used"
    out.mkdir()
    (out / "aifab-run.json").write_text(json.dumps({"name": "someone-else"}))
    return out


@pytest.mark.vllm
def test_finetune_then_serve_the_adapter_it_answers_pong(shell, tiny_model, data, tmp_path):
    run = shell.run_line_magic(
        "finetune", f"{tiny_model} {data} --name pong --max-steps 80 --lr 1e-3 --seq-len 64 "
                    f"--output {tmp_path}/pong --serve")
    served = run.wait_served(600)  # --serve: vLLM with the adapter, once the run finished
    try:
        client = served.client()

        def reply(model: str) -> str:
            r = client.chat.completions.create(
                model=model, max_tokens=4, temperature=0,
                messages=[{"role": "user", "content": "ping 42"}])
            return r.choices[0].message.content.strip()

        assert reply("pong") == "pong"  # the adapter, by the run's name
        assert reply(served.model) != "pong"  # the base model has not learned it
    finally:
        served.stop()


def test_sigusr1_checkpoints_and_stops_then_resume_finishes(jupyter, shell, tiny_model, data,
                                                            tmp_path):
    """What Slurm sends before the walltime: the run saves a checkpoint where it is."""
    import aifab

    opts = dict(max_steps=2000, lr=1e-3, seq_len=64, save_steps=1000,
                output=f"{tmp_path}/sig")
    run = aifab.finetune(str(tiny_model), str(data), name="sig", **opts)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(steps(run.metrics())) < 5:
        time.sleep(0.1)
    os.kill(run.info["pid"], signal.SIGUSR1)
    failed = jupyter.wait_service("sig", "failed", 60)
    assert "interrupted" in failed["error"] and "--resume" in failed["error"]
    stopped = next(m for m in run.metrics() if m.get("event") == "interrupted")
    assert stopped["reason"] == "SIGUSR1"
    ckpt = Path(opts["output"]) / "checkpoints" / f"checkpoint-{stopped['step']}"
    assert (ckpt / "aifab-complete").is_file()  # not the 1000-step schedule: right now

    with pytest.raises(aifab.magics.finetuning.FineTuneError, match="changed: lora_r 8 -> 16"):
        aifab.finetune(str(tiny_model), str(data), name="sig", resume=True, lora_r=16, **opts)
    opts["max_steps"] = stopped["step"] + 10
    resumed = aifab.finetune(str(tiny_model), str(data), name="sig", resume=True, **opts)
    resumed.wait(300)
    assert steps(resumed.metrics())[-1]["step"] == stopped["step"] + 10


def test_a_stopped_run_resumes_through_the_rest_api_with_its_own_options(
        jupyter, shell, tiny_model, data, tmp_path):
    """The panel's Resume: POST .../NAME/resume, no options sent; the server continues the
    run from its last checkpoint with the options it was started with."""
    import aifab

    run = aifab.finetune(str(tiny_model), str(data), name="again", max_steps=30, lr=1e-3,
                         seq_len=64, save_steps=1000, output=f"{tmp_path}/again")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(steps(run.metrics())) < 3:
        time.sleep(0.1)
    early = jupyter.request("POST", "aifab/api/services/again/resume")
    assert early.status_code == 409 and "stop it before resuming it" in early.json()["message"]
    stopped = jupyter.request("DELETE", "aifab/api/services/again").json()
    assert stopped["status"] == "stopped" and "checkpoint was saved" in stopped["error"]
    at = next(m for m in run.metrics() if m.get("event") == "interrupted")["step"]
    assert 0 < at < 30

    resumed = jupyter.request("POST", "aifab/api/services/again/resume")
    assert resumed.status_code == 201, resumed.text
    assert jupyter.wait_service("again", "finished", 300)["status"] == "finished"
    metrics = run.metrics()
    starts = [m for m in metrics if m.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["resume_from"].endswith(f"checkpoint-{at}")
    after = steps(metrics[metrics.index(starts[1]):])
    assert after[0]["step"] > at and after[-1]["step"] == 30  # its own max_steps, kept

    done = jupyter.request("POST", "aifab/api/services/again/resume")
    assert done.status_code == 400
    assert done.json()["message"] == "run 'again' finished: there is nothing to resume"
    missing = jupyter.request("POST", "aifab/api/services/nosuch/resume")
    assert missing.status_code == 404 and "no service named 'nosuch'" in missing.json()["message"]


def test_near_the_walltime_the_trainer_checkpoints_by_itself(tiny_model, data, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "AIFAB_WALLTIME_END": str(int(time.time()) + 60)}
    out = subprocess.run(
        [sys.executable, "-m", "aifab.extension.trainer", "--model", str(tiny_model),
         "--data", str(data), "--output", str(tmp_path / "wt"), "--max-steps", "500",
         "--seq-len", "64", "--walltime-margin", "3600"],
        env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 75, out.stderr[-2000:]
    events = [json.loads(line) for line in (tmp_path / "wt" / "metrics.jsonl").open()]
    stop = next(e for e in events if e.get("event") == "interrupted")
    assert stop["reason"] == "walltime" and stop["step"] == 1
    assert (tmp_path / "wt" / "checkpoints" / "checkpoint-1" / "aifab-complete").is_file()


def test_cell_magic_takes_yaml(shell, tiny_model, data, tmp_path):
    run = shell.run_cell_magic("finetune", "", f"model: {tiny_model}\ndata: {data}\n"
                                               f"name: cell\nmax_steps: 5\nseq_len: 64\n"
                                               f"lr: 2e-4\noutput: {tmp_path}/cell\n")
    run.wait(300)
    assert steps(run.metrics())[-1]["step"] == 5
    with pytest.raises(UsageError, match="unknown key"):
        shell.run_cell_magic("finetune", "", f"model: {tiny_model}\ndata: {data}\nsteps: 5\n")
    with pytest.raises(UsageError, match="seq_len='long': expected an integer"):
        shell.run_cell_magic("finetune", "", f"model: {tiny_model}\ndata: {data}\n"
                                             "seq_len: long\n")
