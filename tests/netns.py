"""A network namespace of the test's own, linked to the host by a veth pair the test creates.

    with Namespace() as ns:         # ns.host_ip on the host's end, ns.ns_ip inside
        ...ns.prefix + [command]    # runs a command inside (its own TCP/IP stack)
        ns.cut(); ns.heal()         # nftables drop of everything inside; deleting the table heals

Addresses are on the pair only (a /30 of 10.213.0.0/16 that no interface uses); teardown
deletes the namespace, which deletes the pair.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from types import TracebackType

CUT = """
table inet lgcut {
  chain input { type filter hook input priority 0; policy drop; }
  chain output { type filter hook output priority 0; policy drop; }
}
"""


def _run(*args: str, stdin: str | None = None) -> None:
    subprocess.run(args, input=stdin, text=True, check=True, capture_output=True, timeout=30)


def unavailable() -> str | None:
    """Why namespaces with nftables cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install -y iproute2 nftables)"
    probe = f"lgprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "exec", probe, "nft", "-f", "-", stdin=CUT)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot make a network namespace with nftables here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _free_subnet() -> int:
    """A third octet n such that no interface here has an address in 10.213.n.0/24."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=30).stdout
    for n in [*range(os.getpid() % 250 + 1, 251), *range(1, os.getpid() % 250 + 1)]:
        if f" 10.213.{n}." not in used:
            return n
    raise RuntimeError("every 10.213.n.0/24 is taken on this machine; delete stale lgh* links (`ip link`)")


class Namespace:
    def __init__(self) -> None:
        self.name = f"lgns{os.getpid()}"
        self.host_if, self.ns_if = f"lgh{os.getpid()}"[:15], f"lgn{os.getpid()}"[:15]
        self.host_ip = self.ns_ip = ""

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def __enter__(self) -> Namespace:
        n = _free_subnet()
        self.host_ip, self.ns_ip = f"10.213.{n}.1", f"10.213.{n}.2"
        try:
            _run("ip", "netns", "add", self.name)
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _run("ip", "link", "set", self.ns_if, "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            _run(*self.prefix, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            _run(*self.prefix, "ip", "link", "set", self.ns_if, "up")
            _run(*self.prefix, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        return self

    def cut(self) -> None:
        """Drop every packet in and out: connections stay established, nothing passes."""
        _run(*self.prefix, "nft", "-f", "-", stdin=CUT)

    def heal(self) -> None:
        _run(*self.prefix, "nft", "delete", "table", "inet", "lgcut")

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)  # gone with the namespace

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.delete()
