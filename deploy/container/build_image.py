#!/usr/bin/env python3
"""Build the egressd OCI image without a registry and without a container runtime.

Why this exists beside the Containerfile: the Containerfile needs a runtime and a registry
(``FROM debian:12-slim``), and neither is available where egressd is developed and tested
(the runtime's ``setrlimit`` is refused there). This builds an equivalent image from Debian
packages alone, so the image's own file system can be tested for real (tests/e2e/test_image.py):

1. **base layer**: ``mmdebstrap`` makes a Debian 12 root file system of the Essential packages
   plus exactly ``packages.txt`` (no recommends, no apt, no man pages, docs or locales), and
   the non-root user ``egressd`` (65532). Cached as ``build/image/base-<key>.tar``, the key
   being a hash of everything that decides its content (suite, mirrors, packages, options,
   this file's BASE_RECIPE version): a cold build takes minutes, a cached one nothing.
2. **egressd layer**: this checkout's wheel (and its dependencies' wheels) installed into a
   venv at ``/opt/egressd`` by the image's own Python (in a chroot of the base), plus the
   entrypoint ``/usr/local/bin/egressd`` (entrypoint.sh). Cached by a hash of the sources.
3. **OCI image archive** (``build/image/egressd-oci.tar``): an OCI image layout (index.json,
   oci-layout, blobs) in one tar, what ``skopeo copy oci-archive:...`` or ``podman load``
   take. Layers are gzip'd tars with fixed mtimes and owners, sorted by name (not bit-for-bit
   reproducible: the .pyc files pip writes carry the wheels' times).

Security updates: the cache key does not know what the mirror published since; ``--refresh``
(or deleting build/image) rebuilds the base from today's packages.

Needs root (mmdebstrap's root mode, chroot) and network access to the Debian mirror and PyPI
(or a pip cache). Usage: deploy/container/build_image.py [--out DIR] [--refresh] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
UID = 65532  # the "nonroot" id distroless images use; no host user has it by accident
BASE_RECIPE = 2  # bump when build_base() changes what it puts in the tar
# --variant=essential: Essential:yes packages and what --include asks for, nothing else (no apt:
# the image is never upgraded in place, it is rebuilt). dpkg drops docs, man pages and locales.
# The merged-usr hook lays out the merged /usr as debootstrap does and installs usr-is-merged:
# without it, apt satisfies init-system-helpers' "usrmerge | usr-is-merged" with usrmerge,
# which pulls in perl (~50 MB) for a conversion the image never needs.
MMDEBSTRAP_OPTS = (
    "--variant=essential",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    '--aptopt=APT::Install-Recommends "false"',
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
)
# The egressd layer's inputs: what ends up in the wheel, and the entrypoint.
APP_INPUTS = ("egressd", "rules", "pyproject.toml", "README.md", "deploy/container/entrypoint.sh")
EPOCH = 0  # mtime of every file in the layers we write


def packages() -> list[str]:
    """packages.txt without comments: the one list of runtime packages (Containerfile reads it too)."""
    out = []
    for line in (HERE / "packages.txt").read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            out.append(name)
    return out


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def base_key() -> str:
    spec = {"suite": SUITE, "mirrors": MIRRORS, "packages": packages(), "opts": MMDEBSTRAP_OPTS}
    spec.update(recipe=BASE_RECIPE, uid=UID)
    return _digest(json.dumps(spec, sort_keys=True).encode())[:16]


def app_key() -> str:
    h = hashlib.sha256()
    for name in APP_INPUTS:
        root = REPO / name
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            if "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _run(argv: list[str], **kw: Any) -> None:
    print("+ " + " ".join(argv), file=sys.stderr, flush=True)
    subprocess.run(argv, check=True, **kw)


def build_base(out: Path, refresh: bool) -> Path:
    """The Debian layer as a plain tar, from cache when its key matches."""
    target = out / f"base-{base_key()}.tar"
    if target.exists() and not refresh:
        return target
    # The user and the directories the daemon writes; /etc/passwd is in this layer, so the
    # user is too. Root's password field is locked ("*") as in Debian's own images.
    hooks = [
        f"echo 'egressd:x:{UID}:{UID}:egressd:/nonexistent:/usr/sbin/nologin' >> \"$1/etc/passwd\"",
        f"echo 'egressd:x:{UID}:' >> \"$1/etc/group\"",
        "echo 'egressd:*:19000:0:99999:7:::' >> \"$1/etc/shadow\"",
        'install -d -m 0755 "$1/etc/egressd"',
        # caches mmdebstrap leaves that nothing in the image reads
        'rm -rf "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old "$1"/var/log/*.log',
    ]
    tmp = target.with_suffix(".tmp")
    argv = ["mmdebstrap", "--format=tar", *MMDEBSTRAP_OPTS, "--include=" + ",".join(packages())]
    argv += [f"--customize-hook={h}" for h in hooks]
    argv += [SUITE, str(tmp), *MIRRORS]
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(EPOCH))
    t0 = time.monotonic()
    _run(argv, env=env)
    tmp.rename(target)
    print(f"base layer built in {time.monotonic() - t0:.0f} s: {target}", file=sys.stderr, flush=True)
    _prune(out, "base-*.tar*", target)
    return target


def build_wheels(out: Path) -> Path:
    """This checkout's wheel and its dependencies' wheels (pip's cache makes a rebuild cheap)."""
    wheels = out / f"wheels-{app_key()}"
    if wheels.is_dir():
        return wheels
    tmp = Path(tempfile.mkdtemp(prefix="wheels-", dir=out))
    try:
        _run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(tmp), str(REPO)])
        # pip itself, run from its wheel inside the chroot: the image keeps no pip
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(tmp), "pip"])
        tmp.rename(wheels)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in out.glob("wheels-*"):
        if old != wheels and old.is_dir():
            shutil.rmtree(old)
    return wheels


def build_app_layer(out: Path, base: Path, wheels: Path) -> Path:
    """/opt/egressd (a venv of the image's python3) and /usr/local/bin/egressd, as a tar."""
    target = out / f"app-{base_key()}-{app_key()}.tar"
    if target.exists():
        return target
    root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=out))
    try:
        _run(["tar", "-C", str(root), "-xf", str(base)])
        shutil.copytree(wheels, root / "tmp" / "wheels")
        (pip_whl,) = (root / "tmp" / "wheels").glob("pip-*.whl")
        _run(["chroot", str(root), "python3", "-m", "venv", "--without-pip", "/opt/egressd"])
        pip = ["chroot", str(root), "/opt/egressd/bin/python3", f"/tmp/wheels/{pip_whl.name}/pip"]
        # The host's pip settings (find-links, indexes) mean nothing inside the image.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        _run([*pip, "install", "-q", "--no-index", "--no-cache-dir", "--find-links", "/tmp/wheels", "egressd"], env=env)
        shutil.rmtree(root / "tmp" / "wheels")
        entry = root / "usr" / "local" / "bin" / "egressd"
        entry.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HERE / "entrypoint.sh", entry)
        entry.chmod(0o755)
        # The directories the daemon writes (mmdebstrap empties /run when it finishes the base).
        for d in ("run/egressd", "var/log/egressd"):
            (root / d).mkdir(mode=0o750, parents=True, exist_ok=True)
            os.chown(root / d, UID, UID)
            (root / d).chmod(0o750)
        tmp = target.with_suffix(".tmp")
        _tar(root, ["opt/egressd", "run/egressd", "usr/local/bin/egressd", "var/log/egressd"], tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _prune(out, "app-*.tar*", target)
    return target


def _prune(out: Path, pattern: str, keep: Path) -> None:
    """Layers (and their .gz) of earlier inputs: the cache holds one version of each layer."""
    for old in out.glob(pattern):
        if old.is_file() and old not in (keep, keep.with_name(keep.name + ".gz")):
            old.unlink()


def _tar(root: Path, paths: list[str], dest: Path) -> None:
    """A reproducible tar: sorted, fixed mtime, numeric owners as on disk."""
    _run(
        ["tar", "-C", str(root), "--sort=name", f"--mtime=@{EPOCH}", "--numeric-owner", "--format=posix",
         "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime", "-cf", str(dest), *paths]
    )  # fmt: skip


def _gzip_blob(src: Path, blobs: Path, cache: Path) -> tuple[str, int, str]:
    """(compressed digest, compressed size, uncompressed digest); the .gz is cached beside src."""
    gz = cache / (src.name + ".gz")
    diff = hashlib.sha256()
    with src.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            diff.update(chunk)
    if not gz.exists():
        tmp = gz.with_suffix(".tmp")
        with src.open("rb") as f, tmp.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=EPOCH) as z:
            shutil.copyfileobj(f, z, 1 << 20)
        tmp.rename(gz)
    data_digest = hashlib.sha256()
    with gz.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            data_digest.update(chunk)
    d = data_digest.hexdigest()
    shutil.copyfile(gz, blobs / d)
    return d, gz.stat().st_size, diff.hexdigest()


def _blob(blobs: Path, data: bytes) -> tuple[str, int]:
    d = _digest(data)
    (blobs / d).write_bytes(data)
    return d, len(data)


def pack_oci(out: Path, layers: list[Path], dest: Path) -> dict[str, Any]:
    """An OCI image layout in one tar; returns sizes and digests."""
    from egressd import __version__

    layout = Path(tempfile.mkdtemp(prefix="oci-", dir=out))
    try:
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        descs, diff_ids, unpacked = [], [], 0
        for layer in layers:
            d, size, diff = _gzip_blob(layer, blobs, out)
            descs.append(
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": f"sha256:{d}", "size": size}
            )
            diff_ids.append(f"sha256:{diff}")
            unpacked += layer.stat().st_size
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                # Starts as uid 0 with only the pod's capabilities; the entrypoint drops to the
                # egressd user (entrypoint.sh says why). Kubernetes sets the capabilities.
                "User": "0:0",
                "Entrypoint": ["/usr/local/bin/egressd"],
                "Cmd": ["run", "--events-stdout"],  # the shipped default policy, events on stdout
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "WorkingDir": "/",
                "Labels": {
                    "org.opencontainers.image.title": "egressd",
                    "org.opencontainers.image.version": __version__,
                },
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": "1970-01-01T00:00:00Z", "created_by": f"mmdebstrap {SUITE}: {' '.join(packages())}"},
                {"created": "1970-01-01T00:00:00Z", "created_by": "egressd wheel into /opt/egressd; entrypoint"},
            ],
        }
        cd, cs = _blob(blobs, json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": f"sha256:{cd}", "size": cs},
            "layers": descs,
        }
        md, ms = _blob(blobs, json.dumps(manifest, sort_keys=True).encode())
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": f"sha256:{md}",
                    "size": ms,
                    "annotations": {"org.opencontainers.image.ref.name": f"egressd:{__version__}"},
                }
            ],
        }
        (layout / "index.json").write_text(json.dumps(index, sort_keys=True))
        (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        tmp = dest.with_suffix(".tmp")
        _tar(layout, ["oci-layout", "index.json", "blobs"], tmp)
        tmp.rename(dest)
    finally:
        shutil.rmtree(layout, ignore_errors=True)
    compressed = sum(int(d["size"]) for d in descs)
    return {
        "archive": str(dest),
        "manifest": f"sha256:{md}",
        "layers_compressed_bytes": compressed,
        "layers_unpacked_tar_bytes": unpacked,
        "archive_bytes": dest.stat().st_size,
    }


def unpack(archive: Path, dest: Path) -> dict[str, Any]:
    """Unpack an OCI image archive's layers, in order, into ``dest``; returns the image config.

    Follows index.json -> manifest -> config and layers, checking every blob's digest, so what
    is tested is what the archive says the image is. Whiteouts are refused (this builder never
    writes them, and a layer that deletes files would need them applied).
    """
    with tarfile.open(archive) as t:

        def blob(digest: str) -> bytes:
            algo, hexd = digest.split(":", 1)
            f = t.extractfile(f"blobs/{algo}/{hexd}")
            assert f is not None, digest
            data = f.read()
            if _digest(data) != hexd:
                raise ValueError(f"blob {digest} does not match its digest")
            return data

        index = json.loads(t.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config: dict[str, Any] = json.loads(blob(manifest["config"]["digest"]))
        for layer in manifest["layers"]:
            data = gzip.decompress(blob(layer["digest"]))
            with tarfile.open(fileobj=io.BytesIO(data)) as lt:
                if any(os.path.basename(m.name).startswith(".wh.") for m in lt.getmembers()):
                    raise ValueError(f"layer {layer['digest']} has whiteouts; not supported here")
            subprocess.run(["tar", "-C", str(dest), "--numeric-owner", "-xf", "-"], input=data, check=True)
    return config


def build(out: Path, refresh: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    base_cached = (out / f"base-{base_key()}.tar").exists() and not refresh
    base = build_base(out, refresh)
    t_base = time.monotonic() - t0
    wheels = build_wheels(out)
    app = build_app_layer(out, base, wheels)
    info = pack_oci(out, [base, app], out / "egressd-oci.tar")
    info.update(
        base_cached=base_cached,
        base_seconds=round(t_base, 1),
        total_seconds=round(time.monotonic() - t0, 1),
        packages=packages(),
    )
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "build" / "image", help="cache and output directory")
    ap.add_argument("--refresh", action="store_true", help="rebuild the Debian layer from today's packages")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("build_image.py: needs root (mmdebstrap root mode, chroot)", file=sys.stderr)
        return 2
    if shutil.which("mmdebstrap") is None:
        print("build_image.py: mmdebstrap is not installed (apt install mmdebstrap)", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        info = build(args.out, args.refresh)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            mb = 1024 * 1024
            base = "cached" if info["base_cached"] else f"built in {info['base_seconds']} s"
            print(
                f"{info['archive']}: {info['archive_bytes'] / mb:.1f} MiB archive, layers "
                f"{info['layers_compressed_bytes'] / mb:.1f} MiB compressed / "
                f"{info['layers_unpacked_tar_bytes'] / mb:.1f} MiB unpacked, built in {info['total_seconds']} s "
                f"(Debian layer {base})"
            )
        return 0
    return 130


if __name__ == "__main__":
    sys.exit(main())
