"""The two nodes' machines, built on this one: what each node's disk holds (Layout),
the worker's network namespace and the veth pair to it (Link), the worker's mount
namespace, and finding and killing every process of a node."""

import ipaddress
import os
import random
import secrets
import select
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from harness import ROOT, HarnessError, Refused, sh


# --- the layout: what each node sees -------------------------------------------------------


@dataclass
class Layout:
    base: Path

    @property
    def head(self) -> Path:
        """Hidden from the worker: everything the head keeps on its own disk."""
        return self.base / "head"

    @property
    def data(self) -> Path:
        return self.head / "data"

    @property
    def workdir(self) -> Path:
        return self.head / "work"

    @property
    def head_ray(self) -> Path:
        return self.head / "ray"

    @property
    def head_token(self) -> Path:
        return self.head / "auth_token"

    @property
    def shared(self) -> Path:
        """The cluster's shared file system: both nodes see it."""
        return self.base / "shared"

    @property
    def cache(self) -> Path:
        return self.shared / "cache"

    @property
    def storage(self) -> Path:
        return self.shared / "ray_results"

    @property
    def worker(self) -> Path:
        """The worker node's own disk (the head could read it; nothing of ours does)."""
        return self.base / "worker"

    def make(self) -> None:
        for d in (self.data, self.workdir, self.head_ray, self.cache, self.storage, self.worker / "ray",
                  self.worker / "home", self.worker / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(32)
        for path in (self.head_token, self.worker / "auth_token"):  # every node holds its copy
            path.write_text(token)
            path.chmod(0o600)


# --- the network and mount namespaces -----------------------------------------------------


@dataclass
class Link:
    ns: str
    head_if: str
    worker_if: str
    net: ipaddress.IPv4Network

    @property
    def head_ip(self) -> str:
        return str(self.net[1])

    @property
    def worker_ip(self) -> str:
        return str(self.net[2])


def networks_in_use() -> list:
    """Every IPv4 network this machine has an address in or a route to."""
    found = []
    for args, column in ((["ip", "-4", "-o", "addr", "show"], 3), (["ip", "-4", "route", "show", "table", "all"], 0)):
        for line in sh(args, check=False).stdout.splitlines():
            fields = line.split()
            if len(fields) > column and fields[column][0].isdigit():
                try:
                    found.append(ipaddress.ip_network(fields[column], strict=False))
                except ValueError:
                    pass
    return found


def pick_link() -> Link:
    """A /30 in 10.251.0.0/16 that nothing on this machine uses, and names for it."""
    taken = networks_in_use()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.251.{random.randrange(256)}.{4 * random.randrange(64)}/30")
        if not any(net.overlaps(t) for t in taken):
            tag = secrets.token_hex(3)
            return Link(f"lgw-{tag}", f"lgwh-{tag}", f"lgww-{tag}", net)
    raise HarnessError("no free /30 in 10.251.0.0/16")


def make_link(link: Link) -> None:
    """The worker's network namespace and the veth pair to it; Refused if the machine says no."""
    steps = [["ip", "netns", "add", link.ns],
             ["ip", "link", "add", link.head_if, "type", "veth", "peer", "name", link.worker_if],
             ["ip", "link", "set", link.worker_if, "netns", link.ns],
             ["ip", "addr", "add", f"{link.head_ip}/30", "dev", link.head_if],
             ["ip", "link", "set", link.head_if, "up"],
             ["ip", "netns", "exec", link.ns, "ip", "addr", "add", f"{link.worker_ip}/30", "dev", link.worker_if],
             ["ip", "netns", "exec", link.ns, "ip", "link", "set", link.worker_if, "up"],
             ["ip", "netns", "exec", link.ns, "ip", "link", "set", "lo", "up"]]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise Refused(f"`{shlex.join(step)}` failed: {error}") from None
        if done.returncode != 0:
            raise Refused(f"`{shlex.join(step)}` failed: {' '.join(done.stderr.split())}")


def remove_link(link: Link) -> None:
    """The veth pair and the network namespace, whatever of them exists."""
    subprocess.run(["ip", "link", "del", link.head_if], capture_output=True)
    subprocess.run(["ip", "netns", "del", link.ns], capture_output=True)


def start_worker_namespaces(link: Link, layout: Layout) -> subprocess.Popen:
    """A process that holds the worker's mount namespace (inside its network
    namespace) open: the head's directory under an empty read-only tmpfs, /tmp and
    /dev/shm under empty ones. Every worker command enters it with nsenter."""
    hide_ro = [layout.head]
    hide_rw = ["/dev/shm"]
    # /tmp too, unless what the worker must see lives there (a clone of the repository, its venv).
    if not any(Path(p).resolve().is_relative_to("/tmp") for p in (layout.base, ROOT, sys.prefix)):
        hide_rw.append("/tmp")
    script = "set -e\n" + "".join(
        f"mount -t tmpfs -o ro,size=64k lgw-hidden {shlex.quote(str(d))}\n" for d in hide_ro) + "".join(
        f"mount -t tmpfs -o mode=1777 lgw-worker {shlex.quote(str(d))}\n" for d in hide_rw) + \
        "echo ready\nexec sleep infinity >/dev/null 2>&1\n"
    try:
        holder = subprocess.Popen(["ip", "netns", "exec", link.ns, "unshare", "--mount", "--propagation", "private",
                                   "--", "/bin/sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
    except OSError as error:
        raise Refused(f"cannot run unshare in {link.ns}: {error}") from None
    ready, _, _ = select.select([holder.stdout], [], [], 30)
    if not ready or holder.stdout.readline().strip() != "ready":
        holder.kill()
        said = " ".join(holder.communicate()[1].split())[:300]
        raise Refused(f"no mount namespace for the worker (unshare --mount, tmpfs mounts): {said or 'timed out'}")
    return holder


def in_worker(holder: subprocess.Popen, args) -> list:
    """A command line that runs `args` on the worker: in its namespaces, from the repository."""
    return ["nsenter", f"--target={holder.pid}", "--net", "--mount", "--", "/bin/sh", "-c", 'cd "$0" && exec "$@"',
            str(ROOT), *map(str, args)]


# --- a node's processes ----------------------------------------------------------------


def netns_processes(link: Link, spare: int) -> list:
    """Every process in the worker's network namespace but `spare` (the namespace holder)."""
    inode = os.stat(f"/run/netns/{link.ns}").st_ino
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != spare and os.stat(f"/proc/{p.pid}/ns/net").st_ino == inode:
                found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


def kill_all(processes: list) -> int:
    """SIGKILL, as a lost machine would; returns how many. Waits until they are gone,
    reaping those that became this process's children (see adopt_orphans)."""
    for p in processes:
        try:
            p.kill()
        except psutil.Error:
            pass
    pending, deadline = {p.pid for p in processes}, time.time() + 15
    while pending and time.time() < deadline:
        for pid in list(pending):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not ours to reap: its parent will
                pass
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    pending.discard(pid)
            except psutil.NoSuchProcess:
                pending.discard(pid)
        time.sleep(0.1)
    return len(processes)


def adopt_orphans() -> None:
    """Makes this process the child subreaper of what it starts: the daemons `ray start`
    leaves behind (and theirs) stay its descendants, so that cleanup finds every process
    of this check, and no other, even those that renamed themselves (ray::DashboardAgent)."""
    import ctypes

    pr_set_child_subreaper = 36
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        raise Refused(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def descendants() -> list:
    return psutil.Process().children(recursive=True)


def refuse_early() -> None:
    """Refused where the machine cannot build namespaces at all."""
    if os.geteuid() != 0:
        raise Refused("not root: building network and mount namespaces needs root")
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            raise Refused(f"no `{tool}` on PATH")
