"""Test hosts made of Linux network namespaces: a switch, N hosts, an sshd on each, reached over ssh.

Invariant: everything this module creates carries one tag (namespace names, interface names, the
temp dir) and ``TestHosts.close`` removes all of it, whatever state a test left it in. Traffic stays
on 10.213.7.0/24 between these namespaces: the bridge lives in its own namespace (the "switch"), so
the root namespace has no interface on that subnet and no test packet leaves the machine.

Each host ``hN`` is a namespace with one veth into the switch, address ``10.213.7.(10+N)``, its own
``/etc/hosts`` (``ip netns exec`` bind-mounts ``/etc/netns/<ns>/hosts``) and an sshd started in a
new UTS namespace with hostname ``hN``. All hosts share this machine's filesystem and pid namespace,
so the same venv and model directory serve every host, and a process's host is the network
namespace it runs in (``/proc/PID/ns/net``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SUBNET = "10.213.7"
SSHD = "/usr/sbin/sshd"
CLONE_NEWNET = 0x40000000


def available() -> str | None:
    """Why these hosts cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        return "ip netns is missing (apt-get install iproute2)"
    if not Path(SSHD).exists():
        return "sshd is missing (apt-get install openssh-server)"
    return None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def net_namespace(pid: int) -> int | None:
    """The network namespace (its inode) of ``pid``, None when it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


class TestHosts:
    """N test hosts (``h0`` .. ``hN-1``) on one switch; ``h0`` is meant for the server."""

    __test__ = False  # not a test class

    def __init__(self, count: int) -> None:
        self.tag = f"lmn{os.getpid() % 100000}"
        self.names = [f"h{i}" for i in range(count)]
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.switch = f"{self.tag}sw"
        self.sshd: dict[str, subprocess.Popen[bytes]] = {}
        self._threads: dict[str, ThreadPoolExecutor] = {}
        self.ssh_config = self.dir / "ssh_config"
        self._made: list[str] = []  # namespaces, for close()
        self._made_run_sshd = False

    # -- names --------------------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        return f"{self.tag}{host}"

    def address(self, host: str) -> str:
        return f"{SUBNET}.{10 + self.names.index(host)}"

    def ns_id(self, host: str) -> int:
        return os.stat(f"/run/netns/{self.ns(host)}").st_ino  # the inode of /proc/PID/ns/net inside it

    def host_of(self, pid: int) -> str | None:
        """Which test host ``pid`` runs on, or None (the root namespace, or gone)."""
        ids = {self.ns_id(h): h for h in self.names}
        return ids.get(net_namespace(pid) or 0)

    # -- build / tear down --------------------------------------------------------------------------

    def build(self) -> TestHosts:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        if not Path("/run/sshd").exists():  # sshd's privilege separation directory
            Path("/run/sshd").mkdir(mode=0o755)
            self._made_run_sshd = True
        _run("ip", "netns", "add", self.switch)
        self._made.append(self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        key = self.dir / "id_ed25519"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        host_key = self.dir / "host_ed25519"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
        (self.dir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
        # As users configure a cluster: the hosts' key and their host key are named in this file and
        # nowhere else (not in ~/.ssh), so only ``ssh -F ssh_config`` reaches them; a plain ``ssh h1``
        # fails with "Host key verification failed".
        known_hosts = self.dir / "known_hosts"
        kind, public = Path(f"{host_key}.pub").read_text().split()[:2]
        names = ",".join(f"{h},{self.address(h)}" for h in self.names)
        known_hosts.write_text(f"{names} {kind} {public}\n")
        self.ssh_config.write_text(
            f"Host {' '.join(self.names)}\n"
            f"  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  BatchMode yes\n"
            f"  StrictHostKeyChecking yes\n  UserKnownHostsFile {known_hosts}\n  LogLevel ERROR\n"
            "  ConnectTimeout 5\n"
        )
        sshd_config = self.dir / "sshd_config"
        sshd_config.write_text(
            f"HostKey {host_key}\nAuthorizedKeysFile {self.dir}/authorized_keys\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPidFile none\nAcceptEnv *\nLogLevel ERROR\n"
            # Sessions whose client is gone (a cut link) end after 3 missed probes, as on a cluster.
            "ClientAliveInterval 1\nClientAliveCountMax 3\n"
            # A cluster's nodes have the environment on PATH: the venv's prted must be found.
            f"SetEnv PATH={Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin\n"
        )
        for i, host in enumerate(self.names):
            ns = self.ns(host)
            _run("ip", "netns", "add", ns)
            self._made.append(ns)
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            # As Debian writes it: the host's own name is 127.0.1.1, the others' are their addresses.
            others = "".join(f"{self.address(h)} {h}\n" for h in self.names if h != host)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {host}\n{others}")
            (etc / "hostname").write_text(f"{host}\n")
            port = f"{self.tag[-6:]}p{i}"  # switch-side veth name, <= 15 characters
            _run("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", port, "netns", self.switch)
            _run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            self.sshd[host] = subprocess.Popen(
                [*self.exec_argv(host), SSHD, "-D", "-e", "-f", str(sshd_config), "-p", "22"],
                stdout=subprocess.DEVNULL,
                stderr=(self.dir / f"sshd-{host}.log").open("wb"),
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        for host in self.names:
            while self.run_on("h0", ["ssh", "-F", str(self.ssh_config), host, "true"]).returncode:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd on {host} not reachable: {self.sshd_log(host)}")
                time.sleep(0.2)

    def run_on(self, host: str, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on ``host`` and wait (30 s at most)."""
        argv = [*self.exec_argv(host), *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, env={**os.environ, **env})

    def sshd_log(self, host: str) -> str:
        return (self.dir / f"sshd-{host}.log").read_text(errors="replace")

    def exec_argv(self, host: str) -> list[str]:
        """The prefix that runs a command on ``host``: its network namespace and its hostname."""
        return ["ip", "netns", "exec", self.ns(host), "unshare", "--uts", "sh", "-c",
                f'hostname {host} && exec "$@"', "sh"]  # fmt: skip

    def close(self) -> None:
        """Kill every process on the hosts, remove namespaces, /etc/netns entries and the temp dir."""
        for executor in self._threads.values():
            executor.shutdown(wait=False, cancel_futures=True)
        for _ in range(3):  # what dies may have started something: look again
            for pid in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for proc in self.sshd.values():
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(timeout=5)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self._made.clear()
        if self._made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What close() would have had to remove: for the fixture's final check."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left = [line.split()[0] for line in names.splitlines() if line.startswith(self.tag)]
        if Path("/etc/netns").exists():
            left += [str(p) for p in Path("/etc/netns").glob(f"{self.tag}*")]
        return left + ([str(self.dir)] if self.dir.exists() else [])

    # -- processes ----------------------------------------------------------------------------------

    def processes(self, host: str | None = None, *, include_sshd: bool = True) -> dict[int, str]:
        """pid -> command line of every process on ``host`` (every host when None)."""
        ids = {self.ns_id(h) for h in ([host] if host else self.names) if self.ns(h) in self._made}
        daemons = {p.pid for p in self.sshd.values()}
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or net_namespace(int(entry.name)) not in ids:
                continue
            pid = int(entry.name)
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if not cmd:
                continue  # a zombie
            if not include_sshd and (pid in daemons or cmd.startswith(SSHD)):
                continue
            found[pid] = cmd
        return found

    # -- running as a client on a host --------------------------------------------------------------

    def _enter(self, host: str) -> None:
        """setns(2) the calling thread into ``host``'s network namespace (Python 3.11 has no os.setns)."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.ns(host)}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {host}")
        finally:
            os.close(fd)

    def call(self, host: str, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` in a thread that lives in ``host``'s network namespace (HTTP clients)."""
        if host not in self._threads:
            self._threads[host] = ThreadPoolExecutor(4, initializer=self._enter, initargs=(host,))
        return self._threads[host].submit(fn, *args).result()

    def link(self, host: str, up: bool) -> None:
        """Cut (or restore) ``host``'s cable: its switch port goes down, its own interface stays up.

        Packets to and from it are dropped silently, as in a partition: no reset, no error at the peer.
        """
        port = f"{self.tag[-6:]}p{self.names.index(host)}"
        _run("ip", "-n", self.switch, "link", "set", port, "up" if up else "down")


@contextlib.contextmanager
def test_hosts(count: int) -> Iterator[TestHosts]:
    hosts = TestHosts(count).build()
    try:
        yield hosts
    finally:
        hosts.close()
        left = hosts.leftovers()
        assert not left, f"test hosts left behind: {left}"


def shell(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
