"""Listeners of a local run stay on loopback: torch's rendezvous store and gloo's sockets.

torch's ``TCPStore`` server listens on every interface (``*``) whatever ``MASTER_ADDR`` says; the
host only tells clients where to connect. When the advertised host is a loopback address (a local Ray
started on 127.0.0.1 hands its workers ``MASTER_ADDR=127.0.0.1``), nothing outside the machine needs
the store, so :func:`bind_store_to_loopback` makes rank 0 create the listening socket itself, bound
to that address, and hand it to torch (``master_listen_fd``). On clusters the advertised host is
the node's address and nothing changes. gloo's own sockets follow ``GLOO_SOCKET_IFNAME``, which
:func:`local_gloo` sets to the loopback interface for local sessions.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import List

_sockets: List[socket.socket] = []  # listening sockets handed to torch: they must outlive the store


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind_store_to_loopback() -> None:
    """Patch torch's rendezvous so that a rank-0 store advertised on a loopback address listens on
    that address only (idempotent; call before ``init_process_group``)."""
    import importlib

    import torch.distributed as dist

    # the module (torch.distributed re-exports a function of the same name)
    rdzv = importlib.import_module("torch.distributed.rendezvous")

    original = rdzv._create_c10d_store
    if getattr(original, "_smat_loopback", False):
        return
    agent_serves = getattr(rdzv, "_agent_store_serves", lambda h, p: rdzv._torchelastic_use_agent_store())

    def create(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or not is_loopback(hostname) or agent_serves(hostname, port):
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((hostname if hostname != "localhost" else "127.0.0.1", port))
        sock.listen(1024)
        _sockets.append(sock)
        return dist.TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True, timeout=timeout,
                             multi_tenant=True, use_libuv=use_libuv, master_listen_fd=sock.fileno())

    create._smat_loopback = True  # type: ignore[attr-defined]
    rdzv._create_c10d_store = create


def local_gloo() -> None:
    """gloo binds its pair sockets to the interface of ``GLOO_SOCKET_IFNAME`` (else the address the
    host name resolves to): the loopback interface for a local session, unless the user chose one."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


__all__ = ["bind_store_to_loopback", "is_loopback", "local_gloo"]
