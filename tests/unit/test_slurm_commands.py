"""aifab.slurm, the one way to run a Slurm command: against fake Slurm commands on PATH."""

from __future__ import annotations

import asyncio
import os
import stat
import time

import psutil
import pytest

from aifab import slurm


def _script(folder, name: str, body: str):
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """A folder of fake Slurm commands that is all of PATH (a real Slurm client may be
    installed: it must not be found). The scripts name other tools by their full path."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/test.conf")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "hub-secret")
    slurm.calls.clear()
    return folder


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie nobody reaped (no init in a container)."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


def both(argv, **kwargs):
    """run() and arun() answer the same: each result, or each SlurmError."""
    out = []
    for call in (lambda: slurm.run(argv, **kwargs),
                 lambda: asyncio.run(slurm.arun(argv, **kwargs))):
        try:
            out.append(call())
        except slurm.SlurmError as exc:
            out.append(exc)
    return out


def test_stdout_stripped_and_calls_counted(fake_bin):
    _script(fake_bin, "squeue", 'echo "  RUNNING None node1  "\n')
    assert both(["squeue", "-h"]) == ["RUNNING None node1"] * 2
    assert slurm.calls["squeue"] == 2 and slurm.calls["sbatch"] == 0


def test_stdin_reaches_the_command(fake_bin):
    _script(fake_bin, "sbatch", 'read first; [ "$first" = "#!/bin/bash" ] && echo "42;cl"\n')
    assert both(["sbatch", "--parsable"], stdin="#!/bin/bash\nexec true\n") == ["42;cl"] * 2


def test_a_failure_carries_exit_code_stdout_and_stderr(fake_bin):
    _script(fake_bin, "squeue", 'echo partial; echo "slurm_load_jobs error: Invalid job id" >&2;'
                                ' exit 1\n')
    for exc in both(["squeue", "-j", "7"]):
        assert isinstance(exc, slurm.SlurmError) and isinstance(exc, RuntimeError)
        assert (exc.returncode, exc.stdout.strip(), exc.stderr.strip()) == \
            (1, "partial", "slurm_load_jobs error: Invalid job id")
        assert exc.argv == ["squeue", "-j", "7"] and not exc.timed_out
        assert str(exc) == "squeue -j 7 exited 1: slurm_load_jobs error: Invalid job id"


def test_the_message_keeps_the_last_500_characters(fake_bin):
    _script(fake_bin, "sinfo", 'printf "%01000d" 0 >&2; echo END >&2; exit 3\n')
    (exc, _) = both(["sinfo"])
    assert str(exc).endswith("0END") and len(str(exc)) == len("sinfo exited 3: ") + 500


def test_stdout_is_the_message_when_stderr_is_empty(fake_bin):
    _script(fake_bin, "scancel", "echo only-stdout; exit 2\n")
    assert [str(e) for e in both(["scancel", "9"])] == ["scancel 9 exited 2: only-stdout"] * 2


def test_a_command_past_its_deadline_is_killed(fake_bin, tmp_path):
    _script(fake_bin, "squeue", f"echo $$ > {tmp_path}/pid; exec /bin/sleep 30\n")
    t0 = time.monotonic()
    for exc in both(["squeue"], timeout=0.3):
        assert exc.timed_out and exc.returncode is None
        assert str(exc) == "squeue timed out after 0.3s"
        assert gone(int((tmp_path / "pid").read_text()))  # not left sleeping
    assert time.monotonic() - t0 < 5


def test_at_the_deadline_the_commands_children_are_killed_too(fake_bin, tmp_path):
    # like sudo: the command forks and waits, so killing the parent alone leaves the child
    _script(fake_bin, "sacct", f"/bin/sleep 30 & echo $! > {tmp_path}/pid; wait\n")
    t0 = time.monotonic()
    for exc in both(["sacct"], timeout=0.3):
        assert exc.timed_out
        assert gone(int((tmp_path / "pid").read_text()))
    assert time.monotonic() - t0 < 5


def test_a_missing_client_is_127_and_says_so(fake_bin):
    for exc in both(["squeue"]):
        assert exc.returncode == 127
        assert str(exc) == "squeue not found: is the Slurm client installed?"


def test_a_missing_prefix_program_is_named(fake_bin):
    _script(fake_bin, "squeue", "echo ok\n")
    for exc in both(["squeue"], prefix=["no-such-sudo", "-u", "ada"]):
        assert exc.returncode == 127
        assert str(exc) == "no-such-sudo -u ada squeue: no-such-sudo not found"


def test_the_prefix_runs_first(fake_bin):
    _script(fake_bin, "sudo", 'echo "sudo $*"\n')
    assert both(["scancel", "5"], prefix=["sudo", "-E", "-u", "ada"]) == \
        ["sudo -E -u ada scancel 5"] * 2


@pytest.mark.parametrize("argv", [["bash", "-c", "id"], ["/usr/bin/squeue"], ["sbatch2"],
                                  [], [""], ["rm", "-rf", "/"]])
def test_only_slurm_commands_go_through(fake_bin, argv):
    with pytest.raises(ValueError, match="not a Slurm command"):
        slurm.run(argv)
    with pytest.raises(ValueError, match="not a Slurm command"):
        asyncio.run(slurm.arun(argv))
    assert not slurm.calls


def test_a_string_is_not_an_argv(fake_bin):
    with pytest.raises(TypeError, match="argv list"):
        slurm.run("squeue -h")


def test_the_child_gets_a_minimal_environment(fake_bin, monkeypatch):
    _script(fake_bin, "scontrol", "/usr/bin/env | /usr/bin/sort\n")
    monkeypatch.setenv("MUNGE_SOCKET", "/run/munge/x.socket")
    for out in both(["scontrol", "show", "config"]):
        env = dict(line.split("=", 1) for line in out.splitlines())
        assert "JUPYTERHUB_API_TOKEN" not in env
        assert env["SLURM_CONF"] == "/etc/slurm/test.conf"
        assert env["MUNGE_SOCKET"] == "/run/munge/x.socket"
        assert env["PATH"] == str(fake_bin)
    # an explicit env is the whole environment
    (out, _) = both(["scontrol"], env={"PATH": os.environ["PATH"], "ONLY": "1"})
    assert "ONLY=1" in out.splitlines() and "SLURM_CONF" not in out


def test_minimal_env_merges_extra(monkeypatch):
    monkeypatch.setenv("PATH", "/bin")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    env = slurm.minimal_env({"JUPYTERHUB_API_TOKEN": "t", "PATH": "/opt/bin"})
    assert env["JUPYTERHUB_API_TOKEN"] == "t" and env["PATH"] == "/opt/bin"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "SLURM_CONF" not in env
    assert set(slurm.minimal_env()) <= {"PATH", "LANG", "SLURM_CONF", "MUNGE_SOCKET"}


def test_client_configured(monkeypatch, tmp_path):
    monkeypatch.setattr(slurm.os.path, "exists", lambda p: False)
    assert not slurm.client_configured({})
    assert slurm.client_configured({"SLURM_CONF": "/x/slurm.conf"})
    assert slurm.client_configured({"SLURM_JOB_ID": "12"})  # inside a job (configless)
    monkeypatch.setattr(slurm.os.path, "exists", lambda p: p == "/etc/slurm/slurm.conf")
    assert slurm.client_configured({})


def test_have_client(fake_bin, monkeypatch):
    assert not slurm.have_client()  # no squeue on PATH
    _script(fake_bin, "squeue", "true\n")
    assert slurm.have_client()  # SLURM_CONF is set by the fixture
    monkeypatch.delenv("SLURM_CONF")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(slurm.os.path, "exists", lambda p: False)
    assert not slurm.have_client()


def test_cancelling_arun_kills_the_command(fake_bin, tmp_path):
    _script(fake_bin, "srun", f"echo $$ > {tmp_path}/pid; exec /bin/sleep 30\n")

    async def main():
        task = asyncio.ensure_future(slurm.arun(["srun", "true"]))
        while not (tmp_path / "pid").exists():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert gone(int((tmp_path / "pid").read_text()))
