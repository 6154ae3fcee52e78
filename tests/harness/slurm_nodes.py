"""A Slurm cluster of several nodes on one machine: each ``slurmd`` in a network and UTS
namespace of its own (its own hostname, its own address), one ``slurmctld`` beside the tests.

    cluster = NamespacedCluster(work_root / "multi", nodes=2)
    cluster.start()                      # bridge, namespaces, daemons; nodes idle
    cluster.run("srun", "-N2", "hostname")   # -> node1, node2
    cluster.stop()                       # daemons, then every namespace and link it made

The network exists only inside what the harness makes: a bridge in the test's own namespace
with the controller's address (``10.213.X.1/24``, a private range), and per node a veth pair
into a namespace ``aifab-<port>-<node>`` whose end has the node's address. Nothing is routed
anywhere else; the tests reach the nodes (a service on a node, srun's I/O) over that bridge.
The daemons share the machine's file system (config, munge socket, spool, the users' homes),
as a cluster's shared file system would.

Each part is undone by ``stop()``, and ``start()`` removes what a crashed earlier run of the
same cluster left (its namespaces and links are named after the controller's port).
``available()`` says why a machine cannot run it (no root, no ``ip``, ``nsenter`` or
``unshare``, no network namespaces): the multi-node tests skip with that reason, the one-node
tests still run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from .slurm import SlurmCluster, SlurmConfig, SlurmHarnessError


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise SlurmHarnessError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def available() -> str:
    """"" when this machine can run a namespaced cluster, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (Debian packages iproute2, util-linux)"
    probe = f"aifab-probe-{os.getpid()}"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"this kernel or container allows no network namespace: {res.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


class NamespacedCluster(SlurmCluster):
    """``nodes`` slurmds named node1..nodeN, each with ``cpus``, ``mem_mb`` and ``gpus`` fake
    GPUs of ``gpu_type``; ``ctld_port`` must differ from any other cluster's (it also names
    the namespaces and links); ``subnet`` is the first three octets of a private /24."""

    def __init__(self, root: Path, *, nodes: int = 2, cpus: int = 4, mem_mb: int = 8000,
                 gpus: int = 2, gpu_type: str = "gh200", partitions=("multi",),
                 ctld_port: int = 6827, subnet: str = "10.213.7"):
        addrs = {f"node{i}": f"{subnet}.{10 + i}" for i in range(1, nodes + 1)}
        super().__init__(SlurmConfig(
            root=root, cpus=cpus, mem_mb=mem_mb, gpus=gpus, gpu_type=gpu_type,
            partitions=tuple(partitions), ctld_port=ctld_port, link_etc=False,
            nodes=addrs, ctld_addr=f"{subnet}.1"))
        self.addresses = addrs
        self.bridge = f"aifabbr{ctld_port}"  # (interface names: at most 15 characters)
        self._netns = {n: f"aifab-{ctld_port}-{n}" for n in addrs}
        self._veth = {n: f"aifab{ctld_port}v{i}" for i, n in enumerate(addrs, 1)}

    # ------------------------------------------------------------------ the network
    def _network_up(self) -> None:
        self._network_down()  # what a crashed run of this cluster left
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.cfg.ctld_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node, addr in self.addresses.items():
            ns, veth = self._netns[node], self._veth[node]
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def _network_down(self) -> None:
        for node in self.addresses:
            _ip("netns", "del", self._netns[node], check=False)  # takes its veth end along
            _ip("link", "del", self._veth[node], check=False)
        _ip("link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """The namespaces and links of this cluster that exist now (none after stop())."""
        spaces = _ip("netns", "list").stdout.split()
        links = _ip("-o", "link", "show").stdout
        return [n for n in self._netns.values() if n in spaces] + [
            name for name in (self.bridge, *self._veth.values()) if f" {name}:" in links
            or f" {name}@" in links]

    # ------------------------------------------------------------------ the daemons
    def _check_slurmd_port(self, node: str) -> None:
        pass  # each slurmd binds in its own namespace: no port to share

    def _slurmd_argv(self, node: str) -> list[str]:
        # nsenter: the node's network (not `ip netns exec`, whose fresh /sys has no cgroup
        # file system, which slurmd needs); unshare --uts: a hostname of its own, and --mount:
        # an /etc/hosts that names every node, as a cluster's DNS does (torch's rendezvous and
        # gloo look the nodes up by name), both set before slurmd starts so that jobs and
        # steps on the node see them too
        return ["nsenter", f"--net=/run/netns/{self._netns[node]}", "--",
                "unshare", "--uts", "--mount", "--propagation", "private", "--",
                "sh", "-c", 'mount --bind "$3" /etc/hosts && hostname "$1" && '
                'exec slurmd -f "$2" -N "$1"', "sh", node, str(self.conf_path),
                str(self._hosts_file())]

    # ------------------------------------------------------------------ a lost node
    def take_node_away(self, node: str) -> int:
        """A lost node: its slurmd stops and every process in its network namespace (its
        jobs and their children) is killed at once. Returns how many processes were."""
        net = os.stat(f"/run/netns/{self._netns[node]}").st_ino
        self._kill([f"slurmd@{node}"])
        killed = 0
        for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino == net:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            except OSError:
                pass
        return killed

    def bring_node_back(self, node: str, timeout: float = 120) -> None:
        """Start the node's slurmd again and wait until Slurm schedules on it."""
        name = f"slurmd@{node}"
        self._pidfile[name].unlink(missing_ok=True)
        self._spawn(name, self._slurmd_argv(node))
        self._await_pidfile(name, 15)

        def usable() -> bool:
            state = self.run("sinfo", "-h", "-n", node, "-o", "%T", check=False).stdout
            if "down" in state or "drain" in state:
                self.run("scontrol", "update", f"NodeName={node}", "State=RESUME",
                         check=False)
            return state.strip().rstrip("*") in ("idle", "mixed", "allocated")

        self.wait_for(usable, timeout, what=f"{node} back in service")

    def _hosts_file(self) -> Path:
        path = self.root / "etc" / "hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("127.0.0.1 localhost\n" + "".join(
            f"{addr} {node}\n" for node, addr in self.addresses.items()))
        path.chmod(0o644)
        return path

    def start(self, timeout: float = 90, warmup: bool = True) -> None:
        why = available()
        if why:
            raise SlurmHarnessError(f"no namespaced Slurm here: {why}")
        # slurmds a crashed run left live in namespaces that are about to be made anew
        self._kill([f"slurmd@{n}" for n in self.addresses])
        try:
            self._network_up()
            super().start(timeout=timeout, warmup=warmup)
        except BaseException:
            self._network_down()
            raise

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._network_down()
        left = self.leftovers()
        if left:
            raise SlurmHarnessError(f"could not remove {left}")
