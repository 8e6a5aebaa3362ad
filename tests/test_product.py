"""What a node installs is the product and nothing else: the wheel's files, its dependencies,
and no scapy anywhere in egressd (a test/dev tool, not a runtime dependency).

Why these are tests: the lab (namespaces, real peers, a working Stratum miner client), the demo
and the test harnesses live in the development-only ``egressd-lab`` distribution (``lab/``); a
packaging change that pulled any of it back into the wheel would ship a miner handshake client
to every training node, and nothing else would notice.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = REPO / "egressd"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel built from the checkout as a fresh clone holds it (lab/ included: the wheel must
    leave it out), without the working files a used checkout gathers (build/ may hold stale files)."""
    src, out = tmp_path_factory.mktemp("src") / "egressd", tmp_path_factory.mktemp("wheel")
    junk = (".git", ".venv", "build", "__pycache__", "*.egg-info", ".*_cache", ".hypothesis")
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*junk))
    p = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", str(src), "--no-deps", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (whl,) = out.glob("egressd-*.whl")
    return zipfile.ZipFile(whl)


def test_the_wheel_holds_the_product_and_the_shipped_rules_only(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"egressd", "egressd-0.1.0.data", "egressd-0.1.0.dist-info"}, tops
    modules = {n for n in names if n.startswith("egressd/")}
    # Exactly the package's own files (every .py under egressd/ in the checkout, and py.typed).
    expected = {str(p.relative_to(REPO)) for p in PRODUCT.rglob("*.py")} | {"egressd/py.typed"}
    assert modules == expected
    for word in ("lab", "peers", "demo", "harness", "fuzz"):
        assert not [n for n in names if word in n.rsplit("/", 1)[-1] or f"/{word}/" in n], word
    data = "egressd-0.1.0.data/data/share/egressd/rules/"
    shipped = {
        data + "default.yaml",
        data + "allowlist.yaml",
        data + "lists/mining-pools.yaml",
        data + "lists/tunnel-services.yaml",
    }
    assert shipped <= set(names)
    for path in shipped:
        rel = path.removeprefix(data)
        assert wheel.read(path) == (REPO / "rules" / rel).read_bytes(), rel


def test_the_wheel_has_no_stratum_client(wheel: zipfile.ZipFile) -> None:
    # The lab's client is the only code that opens a connection and sends a miner's requests.
    for n in wheel.namelist():
        if n.endswith(".py"):
            text = wheel.read(n).decode()
            for mark in ("def run_client", "class JsonLineClient", "class ClientConfig", "egressd_lab"):
                assert mark not in text, (n, mark)


def test_scapy_is_a_dev_extra_not_a_runtime_dependency(wheel: zipfile.ZipFile) -> None:
    meta = wheel.read("egressd-0.1.0.dist-info/METADATA").decode()
    requires = [ln.removeprefix("Requires-Dist: ") for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    scapy = [r for r in requires if r.startswith("scapy")]
    assert scapy and all('extra == "dev"' in r for r in scapy), requires


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_egressd_module_imports_scapy_even_inside_a_function() -> None:
    offenders = {
        str(p.relative_to(REPO)): sorted(m for m in _imported_modules(p) if m.split(".")[0] in ("scapy", "egressd_lab"))
        for p in PRODUCT.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_egressd_imports_and_replays_a_capture_with_scapy_and_the_lab_unimportable() -> None:
    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['scapy'] = None\n"  # any 'import scapy...' now raises ImportError
        "sys.modules['egressd_lab'] = None\n"
        "import egressd\n"
        "for m in pkgutil.walk_packages(egressd.__path__, 'egressd.'):\n"
        "    importlib.import_module(m.name)\n"
        "from egressd.cli import main\n"
        f"sys.exit(main(['test', {str(REPO / 'pcaps' / 'stratum-v1.pcap')!r}]))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
