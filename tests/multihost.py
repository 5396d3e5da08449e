"""Several "hosts" on one machine for MPI jobs over a real TCP network: Linux network namespaces.

    sudo .venv/bin/python tests/multihost.py --hosts 2 [--rate 1gbit] -- python train.py --dataset mnist ...
    sudo .venv/bin/python tests/multihost.py --hosts 4 --rate 10gbit -- python -m engine.bench distributed ...

Each host is a network namespace with one veth link (eth0, 10.47.K.(i+1)/24) to a bridge in the
machine's own namespace (10.47.K.254, where mpirun runs), optionally limited with tc's tbf in
both directions (--rate: 1gbit, 10gbit). mpirun gets a hostfile of the host names (one slot each)
and starts its daemon (orted) on each host through `plm_rsh_agent`: the agent script below takes
the place of ssh and runs the daemon under `ip netns exec NAME`, with its own host name (a UTS
namespace: MPI_Get_processor_name says its name) and its own disk (a mount namespace in which the
cluster's folder `disk` is that host's folder hosts/NAME, a tmpfs of 512 MiB: the same path on
every host, a different file system on each, as separate machines' local disks). Paths outside `disk` are seen by every host
(as a shared file system). The transport is TCP (`--mca btl tcp,self`: no shared memory between
hosts), on the bridge's subnet only (btl_tcp_if_include, oob_tcp_if_include); the daemons' control
connections use TCP keepalive (5 s idle, 2 s between probes, 3 probes), so a host that drops off
the network is noticed in seconds, not the kernel's two hours.

Needs root, `ip` (iproute2), `unshare` (util-linux) and Open MPI's mpirun; `problem()` says which is
missing. Cleanup (`Cluster.close`, also on an exception and at interpreter exit) kills every
process left in the namespaces and deletes the namespaces, links and bridge; namespaces left by a
process that no longer runs (named fn47-PID-...) are removed by the next Cluster.
"""
import argparse
import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREFIX = "fn47"  # namespaces fn47-PID-K-hI (K: the process's K-th Cluster); links fPIDxKhI (veth, the
#                  machine's side) and fPIDxKbr (the bridge), PID in hex
_SEQ = itertools.count()
ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}

AGENT = r"""#!/bin/sh
# Open MPI's plm_rsh_agent for the namespaces of tests/multihost.py: called as ssh would be,
# `agent [-x ...] HOST COMMAND...`; runs COMMAND (the orted daemon) in the host's network namespace
# with its host name and its own folder mounted on the shared path of the hosts' disks.
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
host=$1; shift
exec ip netns exec "$host" unshare --uts --mount --propagation private sh -c \
  'hostname "$1" && mount --bind "$2/hosts/$1" "$2/disk" && exec sh -c "$3"' agent "$host" "__DIR__" "$*"
"""


def run(*cmd, check=True):
    r = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: {r.stderr.strip() or r.returncode}")
    return r


def problem():
    """Why a Cluster cannot be built on this machine, or None."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (the harness creates namespaces, veth links and a bridge)"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("mpirun", "openmpi-bin")):
        if shutil.which(tool) is None:
            return f"{tool} is not on the PATH (apt-get install {package})"
    name = f"{PREFIX}-probe-{os.getpid()}"
    r = run("ip", "netns", "add", name, check=False)
    if r.returncode != 0:
        return f"ip netns add fails here: {r.stderr.strip()}"
    try:  # the rate limits: tc's tbf queueing discipline, tried on the probe's loopback
        r = run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1gbit",
                "burst", "256k", "latency", "20ms", check=False)
    finally:
        run("ip", "netns", "del", name, check=False)
    if r.returncode != 0:
        return f"tc cannot add a tbf queueing discipline here (rate limits): {r.stderr.strip()}"
    return None


def netns_pids(name):
    r = run("ip", "netns", "pids", name, check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def remove_namespaces(names):
    """Kill every process in these namespaces, then delete them (their veth links go with them)."""
    for name in names:
        for pid in netns_pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for name in names:
        for _ in range(50):  # a killed process leaves its namespace when it is reaped
            if not netns_pids(name):
                break
            time.sleep(0.1)
        run("ip", "netns", "del", name, check=False)


def remove_stale():
    """Namespaces and bridges of Clusters whose process no longer runs."""
    listed = run("ip", "netns", "list", check=False).stdout.split("\n")
    stale, pids = [], set()
    for line in listed:
        m = re.match(rf"({PREFIX}-(\d+)-(\d+)-h\d+)\b", line)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            stale.append(m.group(1))
            pids.add((int(m.group(2)), m.group(3)))
    remove_namespaces(stale)
    for pid, seq in pids:
        run("ip", "link", "del", f"f{pid:x}x{seq}br", check=False)
    with open("/proc/self/mounts") as f:  # the hosts' disks (tmpfs named flatnet-fn47-PID-hI)
        for source, target, *_ in (line.split() for line in f):
            m = re.fullmatch(rf"flatnet-{PREFIX}-(\d+)-\d+-h\d+", source)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                run("umount", "--lazy", target, check=False)


class Cluster:
    """`n` hosts (network namespaces) on a bridge; `rate` ('1gbit', '10gbit', None) limits each host's link.

        with Cluster(2, rate="1gbit") as c:
            r = c.mpirun(["python", "train.py", ...])   # one rank per host
            c.cut(1)                                     # host 1's link down
    """

    def __init__(self, n, rate=None, workdir=None):
        if not 1 <= n <= 16:
            raise ValueError(f"{n} hosts: 1 to 16")
        self.n, self.rate, self.closed = n, rate, False
        pid, seq = os.getpid(), next(_SEQ)
        self.tag = f"f{pid:x}x{seq}"
        self.names = [f"{PREFIX}-{pid}-{seq}-h{i}" for i in range(n)]
        self.links = [f"{self.tag}h{i}" for i in range(n)]
        self.bridge = f"{self.tag}br"
        remove_stale()
        used = set(re.findall(r"inet 10\.47\.(\d+)\.", run("ip", "-o", "addr", check=False).stdout))
        free = [k for k in range(1, 255) if str(k) not in used]
        if not free:
            raise RuntimeError("no free subnet 10.47.K.0/24 for the bridge")
        self.subnet = f"10.47.{free[(pid + seq) % len(free)]}"
        self.dir = Path(tempfile.mkdtemp(prefix="multihost-", dir=workdir))
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # building and cleaning up -----------------------------------------------------------
    def _build(self):
        for name in self.names + [self.bridge] + self.links:  # a previous Cluster of this same process
            run("ip", "netns", "del", name, check=False) if name in self.names else \
                run("ip", "link", "del", name, check=False)
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        (self.dir / "disk").mkdir()
        for i, (name, link) in enumerate(zip(self.names, self.links)):
            (self.dir / "hosts" / name).mkdir(parents=True)
            run("mount", "-t", "tmpfs", "-o", "size=512m", f"flatnet-{name}", self.dir / "hosts" / name)
            run("ip", "netns", "add", name)
            run("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
            run("ip", "link", "set", link, "master", self.bridge, "up")
            ns = ("ip", "netns", "exec", name)
            run(*ns, "ip", "addr", "add", f"{self.subnet}.{i + 1}/24", "dev", "eth0")
            run(*ns, "ip", "link", "set", "eth0", "up")
            run(*ns, "ip", "link", "set", "lo", "up")
            if self.rate:
                self.limit(i, self.rate)
        agent = self.dir / "agent.sh"
        agent.write_text(AGENT.replace("__DIR__", str(self.dir)))
        agent.chmod(0o755)
        self.agent = agent
        self.hostfile = self.dir / "hostfile"
        self.hostfile.write_text("".join(f"{name} slots=1\n" for name in self.names))

    def limit(self, i, rate):
        """Host i's link limited to `rate` (tc's notation: 1gbit) both ways: tbf on each end of its veth."""
        bits = int(re.fullmatch(r"(\d+)([kmg]?)bit", rate.lower()).group(1)) * \
            {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[re.fullmatch(r"\d+([kmg]?)bit", rate.lower()).group(1)]
        burst = max(256 * 1024, bits // 8 // 500)  # 2 ms of traffic, and more than a 64 KiB GSO packet
        for ns, dev in ((None, self.links[i]), (self.names[i], "eth0")):
            pre = ("ip", "netns", "exec", ns) if ns else ()
            run(*pre, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                "latency", "20ms")

    def close(self):
        """Kill what runs in the namespaces; delete them, the links and the bridge, and the cluster's folder."""
        if self.closed:
            return
        self.closed = True
        remove_namespaces(self.names)
        run("ip", "link", "del", self.bridge, check=False)
        for link in self.links:
            run("ip", "link", "del", link, check=False)
        for name in self.names:
            if os.path.ismount(self.dir / "hosts" / name):
                run("umount", "--lazy", self.dir / "hosts" / name, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # using it ---------------------------------------------------------------------------
    def disk(self, i):
        """Host i's own folder: what its processes see at self.dir / 'disk'."""
        return self.dir / "hosts" / self.names[i]

    @property
    def shared_disk(self):
        """The path where each host sees its own disk (self.disk(i) on host i)."""
        return self.dir / "disk"

    def address(self, i):
        return f"{self.subnet}.{i + 1}"

    def cut(self, i):
        """Host i's link down (the machine's end of its veth): its packets go nowhere, nothing tells TCP."""
        run("ip", "link", "set", self.links[i], "down")

    def restore(self, i):
        """Host i's link up again."""
        run("ip", "link", "set", self.links[i], "up")

    def pids(self, i):
        """The processes running on host i (in its network namespace)."""
        return netns_pids(self.names[i])

    def mpirun_args(self, hosts=None, per_host=1):
        """mpirun and its options for one rank per host (or `per_host`) on the first `hosts` hosts."""
        hosts = self.n if hosts is None else hosts
        hostfile = self.hostfile
        if hosts != self.n or per_host != 1:
            hostfile = self.dir / f"hostfile-{hosts}x{per_host}"
            hostfile.write_text("".join(f"{name} slots={per_host}\n" for name in self.names[:hosts]))
        net = f"{self.subnet}.0/24"
        return ["mpirun", "-np", str(hosts * per_host), "--hostfile", str(hostfile), "--map-by", "slot",
                "--bind-to", "none",
                "--mca", "plm_rsh_agent", str(self.agent), "--mca", "plm_rsh_no_tree_spawn", "1",
                "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", net, "--mca", "oob_tcp_if_include", net,
                "--mca", "oob_tcp_keepalive_time", "5", "--mca", "oob_tcp_keepalive_intvl", "2",
                "--mca", "oob_tcp_keepalive_probes", "3",
                "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "PATH"]

    def env(self, **extra):
        return dict(os.environ, **ROOT_ENV, **extra)

    def mpirun(self, command, hosts=None, per_host=1, timeout=180, env=None, cwd=None, wait=True):
        """Run `command` (a list) with one rank per host; a CompletedProcess (or the Popen when not `wait`)."""
        args = [*self.mpirun_args(hosts, per_host), *map(str, command)]
        env = self.env(**(env or {}))
        env.setdefault("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        if not wait:
            return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    cwd=cwd, start_new_session=True)
        return subprocess.run(args, check=False, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                usage="multihost.py --hosts N [--rate RATE] [--keep] -- COMMAND ...")
    p.add_argument("--hosts", type=int, default=2, help="number of hosts (network namespaces), 1 to 16")
    p.add_argument("--rate", default=None, help="limit each host's link, e.g. 1gbit or 10gbit (tc tbf)")
    p.add_argument("--per-host", type=int, default=1, help="ranks per host")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the program every rank runs")
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    why = problem()
    if why:
        sys.exit(f"error: {why}")
    if not command:
        sys.exit("error: no command to run (after --)")
    with Cluster(a.hosts, a.rate) as c:
        args = [*c.mpirun_args(per_host=a.per_host), *command]
        print(f"# {a.hosts} hosts {', '.join(c.names)} on {c.subnet}.0/24"
              f"{f', {a.rate} each' if a.rate else ''}; each host's own disk at {c.shared_disk}", flush=True)
        env = c.env()
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
        return subprocess.run(args, check=False, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
