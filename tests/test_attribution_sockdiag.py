"""sock_diag on the real kernel: the socket of a 4-tuple, its owner uid, inode and cgroup id."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from egressd.attribution import sockdiag
from egressd.attribution.sockdiag import NotFound, SockDiag


@pytest.fixture
def sd(own_netns: tuple[str, str]) -> Iterator[SockDiag]:
    """sock_diag in the test's own network namespace (tests/conftest.py), where its sockets are."""
    s = SockDiag()
    yield s
    s.close()


def _cgroup_id() -> int:
    """The v2 cgroup id of this process: the inode of its cgroup directory."""
    from egressd.attribution.cgroup import cgroup_of, v2_mount

    mount, path = v2_mount(), cgroup_of(os.getpid())
    if mount is None or path is None:
        pytest.skip("no cgroup v2 here")
    return os.stat(mount + path).st_ino


def _pair(fam: int, host: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    srv = socket.socket(fam)
    srv.bind((host, 0))
    srv.listen()
    c = socket.socket(fam)
    c.connect(srv.getsockname()[:2])
    a, _ = srv.accept()
    return srv, c, a


@pytest.mark.parametrize("fam", [socket.AF_INET, socket.AF_INET6])
def test_tcp_lookup_names_uid_inode_and_cgroup(sd: SockDiag, own_netns: tuple[str, str], fam: int) -> None:
    srv, c, a = _pair(fam, own_netns[0] if fam == socket.AF_INET else own_netns[1])
    with srv, c, a:
        lh, lp = c.getsockname()[:2]
        rh, rp = c.getpeername()[:2]
        info = sd.lookup(6, socket.inet_pton(fam, lh), lp, socket.inet_pton(fam, rh), rp)
        assert info.inode == os.fstat(c.fileno()).st_ino
        assert info.uid == os.geteuid()
        assert info.state == "established"
        assert info.cgroup_id == _cgroup_id()


def test_udp_connected_and_unconnected_sockets_are_found(sd: SockDiag, own_netns: tuple[str, str]) -> None:
    host = own_netns[0]
    lo = socket.inet_aton(host)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.connect((host, 9))
        port = u.getsockname()[1]
        assert sd.lookup(17, lo, port, lo, 9).inode == os.fstat(u.fileno()).st_ino
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind((host, 0))  # sendto() without connect(): found by its local port
        port = u.getsockname()[1]
        assert sd.lookup(17, lo, port, lo, 53).inode == os.fstat(u.fileno()).st_ino


def test_a_closed_socket_is_not_found(sd: SockDiag, own_netns: tuple[str, str]) -> None:
    host = own_netns[0]
    srv, c, a = _pair(socket.AF_INET, host)
    lp, rp = c.getsockname()[1], c.getpeername()[1]
    lo = socket.inet_aton(host)
    assert sd.lookup(6, lo, lp, lo, rp).inode == os.fstat(c.fileno()).st_ino
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # reset: no TIME_WAIT left behind
    a.close()
    srv.close()
    with pytest.raises(NotFound):
        sd.lookup(6, lo, lp, lo, rp)


@pytest.mark.skipif(os.geteuid() != 0, reason="SOCK_DESTROY needs CAP_NET_ADMIN")
def test_destroy_aborts_the_local_socket(sd: SockDiag, own_netns: tuple[str, str]) -> None:
    host = own_netns[0]
    srv, c, a = _pair(socket.AF_INET, host)
    with srv, c, a:
        lo = socket.inet_aton(host)
        sd.destroy(6, lo, c.getsockname()[1], lo, c.getpeername()[1])
        with pytest.raises(ConnectionAbortedError):
            c.recv(1)


def test_parse_reply_reports_kernel_errors() -> None:
    hdr = struct.Struct("=IHHII")
    err = hdr.pack(hdr.size + 4 + 16, sockdiag.NLMSG_ERROR, 0, 7, 0) + struct.pack("=i", -errno.ENOENT) + bytes(16)
    with pytest.raises(NotFound):
        sockdiag.parse_reply(err, 7)
    perm = hdr.pack(hdr.size + 4 + 16, sockdiag.NLMSG_ERROR, 0, 7, 0) + struct.pack("=i", -errno.EPERM) + bytes(16)
    with pytest.raises(PermissionError):
        sockdiag.parse_reply(perm, 7)
    with pytest.raises(NotFound):
        sockdiag.parse_reply(b"\x00" * 3, 7)  # truncated: nothing to read
