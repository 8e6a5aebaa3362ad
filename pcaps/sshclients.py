"""The Python SSH clients the usage captures drive: paramiko, asyncssh and sshtunnel.

Run by pcaps/make.py in the lab's node namespace (``python pcaps/sshclients.py CLIENT USE
CIPHER --host H --key K --srv DIR``); each use does what a program built on the library
does, once, and exits 0 only when it worked (the output proves it: "ssh-ok", the forwarded
service's "forwarded-ok", the file's length). Every step has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from typing import Any

FWD_PORT = 8080
TIMEOUT = 15.0

# paramiko: what to leave enabled (it has no chacha20-poly1305).
PARAMIKO = {
    "ctr": ("aes128-ctr", "hmac-sha2-256"),  # its default choice
    "ctr-etm": ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
    "gcm": ("aes256-gcm@openssh.com", "hmac-sha2-256"),
}
ASYNCSSH = {
    "chacha": ("chacha20-poly1305@openssh.com", "hmac-sha2-256-etm@openssh.com"),  # its default choice
    "gcm": ("aes256-gcm@openssh.com", "hmac-sha2-256-etm@openssh.com"),
    "ctr-etm": ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
    "ctr": ("aes256-ctr", "hmac-sha2-512"),
}


def _paramiko(args: argparse.Namespace) -> None:
    import paramiko

    cipher, mac = PARAMIKO[args.cipher]
    t = paramiko.Transport
    disabled = {
        "ciphers": [c for c in t._preferred_ciphers if c != cipher],
        "macs": [m for m in t._preferred_macs if m != mac],
    }
    cl = paramiko.SSHClient()
    cl.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    cl.connect(
        args.host, username="root", key_filename=args.key, timeout=TIMEOUT, allow_agent=False,
        look_for_keys=False, disabled_algorithms=disabled,
    )  # fmt: skip
    try:
        tr = cl.get_transport()
        assert tr is not None
        if args.use == "cmd":
            _in, out, _err = cl.exec_command("echo ssh-ok", timeout=TIMEOUT)
            print(out.read().decode().strip())
        elif args.use == "remote-N":
            port = tr.request_port_forward("127.0.0.1", 2230)
            print(f"remote forward on {port}")
            time.sleep(1.0)
        elif args.use == "local":
            ch = tr.open_channel("direct-tcpip", (args.host, FWD_PORT), ("127.0.0.1", 40000), timeout=TIMEOUT)
            ch.settimeout(TIMEOUT)
            print(ch.recv(100).decode().strip())
            ch.close()
        elif args.use == "sftp":
            sf = cl.open_sftp()
            data = sf.open(f"{args.srv}/file.bin").read()
            print(f"sftp {len(data)} bytes")
            sf.close()
        else:
            raise SystemExit(f"paramiko: unknown use {args.use}")
    finally:
        cl.close()


async def _asyncssh(args: argparse.Namespace) -> None:
    import asyncssh

    cipher, mac = ASYNCSSH[args.cipher]
    async with asyncssh.connect(
        args.host, username="root", client_keys=[args.key], known_hosts=None, encryption_algs=[cipher],
        mac_algs=[mac], compression_algs=None, connect_timeout=TIMEOUT,
    ) as conn:  # fmt: skip
        if args.use == "cmd":
            r = await asyncio.wait_for(conn.run("echo ssh-ok", check=True), TIMEOUT)
            print(str(r.stdout).strip())
        elif args.use == "remote-N":
            lis = await conn.forward_remote_port("127.0.0.1", 2231, "127.0.0.1", 22)
            print(f"remote forward on {lis.get_port()}")
            await asyncio.sleep(1.0)
            lis.close()
        elif args.use == "local":
            lis = await conn.forward_local_port("127.0.0.1", 9010, args.host, FWD_PORT)
            reader, writer = await asyncio.open_connection("127.0.0.1", 9010)
            print((await asyncio.wait_for(reader.read(100), TIMEOUT)).decode().strip())
            writer.close()
            await asyncio.sleep(0.3)
            lis.close()
        elif args.use == "sftp":
            async with conn.start_sftp_client() as sf, sf.open(f"{args.srv}/file.bin", "rb") as f:
                data = await f.read()
            print(f"sftp {len(data)} bytes")
        else:
            raise SystemExit(f"asyncssh: unknown use {args.use}")


def _sshtunnel(args: argparse.Namespace) -> None:
    import sshtunnel

    with sshtunnel.SSHTunnelForwarder(
        (args.host, 22), ssh_username="root", ssh_pkey=args.key, remote_bind_address=(args.host, FWD_PORT),
        local_bind_address=("127.0.0.1", 9011), allow_agent=False, host_pkey_directories=[],
    ) as tun:  # fmt: skip
        with socket.create_connection(("127.0.0.1", tun.local_bind_port), timeout=TIMEOUT) as s:
            print(s.recv(100).decode().strip())
        time.sleep(0.3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("client", choices=("paramiko", "asyncssh", "sshtunnel"))
    ap.add_argument("use")
    ap.add_argument("cipher")
    ap.add_argument("--host", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--srv", default="/tmp")
    args = ap.parse_args(argv)
    runners: dict[str, Any] = {
        "paramiko": _paramiko,
        "asyncssh": lambda a: asyncio.run(_asyncssh(a)),
        "sshtunnel": _sshtunnel,
    }
    runners[args.client](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
