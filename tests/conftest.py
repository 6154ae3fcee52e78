"""Shared fixtures: real components, started once per test session.

* ``slurm``      a real single-node Slurm (Debian's slurmctld/slurmd/munge), 4 fake GPUs
* ``test_user``  an unprivileged Unix account for jobs that run as a user
* ``tiny_model`` the offline tiny Llama, built once and cached by content hash
* ``hub_factory`` real JupyterHub + configurable-http-proxy processes

When a test fails, the logs of the real components it used are attached to its report.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness.hub import Hub
from tests.harness.slurm import gh200_cluster

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TEST_USER = "aifabtest"


def _gpu_visible() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def _cluster_configured() -> bool:
    path = os.environ.get("KUBECONFIG", "")
    return bool(path) and all(Path(p).is_file() for p in path.split(os.pathsep))


def pytest_report_header(config):
    """Which torch the suite runs on (metadata only: importing torch takes seconds)."""
    from importlib import metadata

    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "torch: not installed (the fast tier needs none)"
    build = "CPU build" if "+cpu" in version or not any(
        d.metadata["Name"].startswith("nvidia-") for d in metadata.distributions()) \
        else "CUDA build"
    return f"torch {version} ({build})"


def pytest_collection_modifyitems(config, items):
    gpu, k8s = _gpu_visible(), _cluster_configured()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(
                reason="no NVIDIA GPU visible here (nvidia-smi lists none); CI machines have "
                       "no GPU, run these where one is"))
        if "k8s_live" in item.keywords and not k8s:
            item.add_marker(pytest.mark.skip(
                reason="KUBECONFIG does not point at a Kubernetes cluster (none can run on "
                       "these machines); manifests are validated offline instead"))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        for name, value in getattr(item, "funcargs", {}).items():
            tail = getattr(value, "log_tail", None)
            if callable(tail):
                rep.sections.append((f"log of fixture {name!r}", tail()))


@pytest.fixture(scope="session")
def work_root():
    """A temporary root that users other than root may traverse (jobs run as test_user)."""
    root = Path(tempfile.mkdtemp(prefix="aifab-tests-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm(work_root):
    if os.geteuid() != 0:
        pytest.fail("the Slurm fixture needs root (slurmd runs jobs as other users); "
                    "run the suite as root, as `make test` does in CI")
    cluster = gh200_cluster(work_root / "slurm")
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_nodes(work_root):
    """A second Slurm of two nodes, each slurmd in network and UTS namespaces of its own
    (tests/harness/slurm_nodes.py); skipped, with the reason, where the machine has none."""
    from tests.harness.slurm_nodes import NamespacedCluster, available

    why = available()
    if why:
        pytest.skip(f"no multi-node Slurm on this machine: {why}")
    cluster = NamespacedCluster(work_root / "slurm-nodes")
    cluster.start()
    yield cluster
    cluster.stop()  # raises if a namespace or link of it is left


@pytest.fixture(scope="session")
def test_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", TEST_USER],
                       check=True)
        return pwd.getpwnam(TEST_USER)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from aifab.magics.tiny_model import build_cached

    cache = Path(os.environ.get("AIFAB_TEST_CACHE", REPO / ".cache")) / "tiny-model"
    return build_cached(cache)


@pytest.fixture(scope="session")
def slurm_hub(slurm, test_user, work_root):
    """One hub with the site example (docs/examples) on the Slurm fixture, for the session."""
    from tests.slurm_hub import create_hub_user, make_slurm_hub

    root = Path(tempfile.mkdtemp(prefix="slurm-hub-", dir=work_root))
    root.chmod(0o755)
    hub = make_slurm_hub(root)
    hub.start()
    create_hub_user(hub, test_user.pw_name)
    yield hub
    hub.stop()  # the site config keeps sessions running over a hub stop: end them here
    jobs = [r["job_id"] for r in slurm.squeue() if r["name"].startswith("aifab-")]
    if jobs:
        slurm.run("scancel", *jobs, check=False)


@pytest.fixture
def ipython_on(monkeypatch):
    """Connect a real IPython shell, with the aifab magics, to a harness Jupyter server."""
    from IPython.core.interactiveshell import InteractiveShell

    def connect(server):
        monkeypatch.setenv("AIFAB_SERVER_URL", server.url)
        monkeypatch.setenv("AIFAB_SERVER_TOKEN", server.token)
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "aifab.magics")
        return ip

    yield connect
    InteractiveShell.clear_instance()


@pytest.fixture
def hub_factory(work_root):
    """Make Hub objects; every hub made is stopped at the end of the test."""
    made: list[Hub] = []

    def make(**kw) -> Hub:
        root = Path(tempfile.mkdtemp(prefix="hub-", dir=work_root))
        root.chmod(0o755)
        hub = Hub(root, **kw)
        made.append(hub)
        return hub

    yield make
    for hub in made:
        hub.stop()
