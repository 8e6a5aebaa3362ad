"""The live daemon on the default policy lets curl move a file that quotes SSH version lines.

Before the fix, downloading any text file with a line starting ``SSH-2.0-`` was judged SSH
(the server's HTTP lines taken for lines before a banner) and the download was reset by
``drop-ssh-unlisted``; uploading it was judged ``ssh.reverse`` and reset too. Real curl, a
real HTTP server in the lab's far namespace, the real daemon on NFQUEUE.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

from daemon_fixtures import NEEDS_KERNEL, DaemonLab, one_event

from egressd_lab import peers
from egressd_lab.netns import SERVICES

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]

HTTP4 = SERVICES["bulk"][0]
UPLOAD_PORT = 8081

# sshd's log and a honeypot's list of banners: version lines first, in the middle and last.
SSHD_LOG = b"".join(
    [
        b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\n",
        b"Dec  5 07:01:02 bastion sshd[1234]: Connection from 198.51.100.9 port 51234\n",
        b"SSH-2.0-libssh_0.10.6\n",
        b"SSH-2.0-Go\n",
        b"Dec  5 07:01:03 bastion sshd[1234]: Connection closed by 198.51.100.9 port 51234\n",
        b"SSH-2.0-PuTTY_Release_0.80\n",
    ]
)

# A PUT sink: reads the body it was promised and answers 201 with the body's sha256.
UPLOAD_SERVER = r"""
import hashlib, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_PUT(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        out = hashlib.sha256(body).hexdigest().encode()
        self.send_response(201)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


def _curl(dlab: DaemonLab, *args: str) -> tuple[int, str, str]:
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", "5", "-w", "%{http_code}", *args]
    p, _ = dlab.run(argv, timeout=15)
    return p.returncode, p.stdout, p.stderr


def _assert_allowed_not_ssh(ev: dict[str, object]) -> None:
    assert (ev["action"], ev["verdict"], ev["rule"], ev["event_type"]) == ("allowed", "accept", "default", "flow"), ev
    assert not [k for k in ev.get("detections", []) if str(k).startswith("ssh")], ev  # type: ignore[attr-defined]


def test_curl_downloads_a_file_of_ssh_version_lines(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    www = dlab.peers.bulk.path.parent
    (www / "sshd.log").write_bytes(SSHD_LOG)
    out = dlab.tmp / f"download-{time.monotonic_ns()}.log"
    rc, code, err = _curl(dlab, "-o", str(out), f"http://{HTTP4}/sshd.log")
    assert (rc, code) == (0, "200"), err
    assert out.read_bytes() == SSHD_LOG
    _assert_allowed_not_ssh(one_event(daemon, HTTP4, 80))


def test_curl_uploads_a_file_of_ssh_version_lines(dlab: DaemonLab, daemon: peers.Egressd, tmp_path: Path) -> None:
    src = tmp_path / "sshd.log"
    src.write_bytes(SSHD_LOG)
    server = dlab.lab.spawn(
        "inet",
        [peers.PY, "-c", UPLOAD_SERVER, HTTP4, str(UPLOAD_PORT)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        peers.wait_listening(dlab.lab, "inet", [(HTTP4, UPLOAD_PORT)])
        rc, out, err = _curl(dlab, "-T", str(src), f"http://{HTTP4}:{UPLOAD_PORT}/upload/sshd.log")
    finally:
        dlab.lab.stop(server)
    assert rc == 0, err
    assert out == hashlib.sha256(SSHD_LOG).hexdigest() + "201"
    _assert_allowed_not_ssh(one_event(daemon, HTTP4, UPLOAD_PORT))
