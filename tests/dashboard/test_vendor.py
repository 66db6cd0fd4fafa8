"""Fetching the dashboard's MQTT.js (bridge/dashboard/vendor.py): the sha512 integrity check,
what is extracted from the tarball and where, over a real local HTTP server."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bridge.dashboard.vendor import BUNDLE, FILES, MQTT_VERSION, extract, install, tarball_url, verify
from bridge.errors import VendorError

pytestmark = pytest.mark.timeout(10)


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def _tarball(members: dict[str, bytes], *, links: tuple[str, ...] = ()) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            archive.addfile(info)
    return out.getvalue()


PACKAGE = {
    "package/dist/mqtt.min.js": b"var mqtt=(()=>{})();",
    "package/LICENSE.md": b"The MIT License (MIT)",
    "package/package.json": b'{"name": "mqtt"}',
    "../../outside.js": b"never written",
}


@pytest.mark.parametrize(
    ("integrity", "error"),
    [
        (_integrity(b"tarball"), None),
        (_integrity(b"another tarball"), "integrity mismatch"),
        ("sha512-", "is not sha512-<base64>"),
        ("sha1-" + base64.b64encode(hashlib.sha1(b"tarball").digest()).decode(), "is not sha512-<base64>"),
        ("", "is not sha512-<base64>"),
    ],
)
def test_verify_accepts_only_the_matching_sha512(integrity: str, error: str | None) -> None:
    if error is None:
        verify(b"tarball", integrity)
        return
    with pytest.raises(VendorError, match=error) as caught:
        verify(b"tarball", integrity)
    assert caught.value.what == f"mqtt {MQTT_VERSION}"


def test_extract_writes_only_the_bundle_and_its_licence_to_fixed_names(tmp_path: Path) -> None:
    dest = tmp_path / "vendor"
    written = extract(_tarball(PACKAGE), dest)
    assert sorted(p.name for p in written) == sorted(FILES.values())
    assert sorted(p.name for p in dest.iterdir()) == sorted(FILES.values())
    assert (dest / BUNDLE).read_bytes() == PACKAGE["package/dist/mqtt.min.js"]
    assert not (tmp_path / "outside.js").exists()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (_tarball({"package/dist/mqtt.min.js": b"x"}), "has no package/LICENSE.md"),
        (
            _tarball({"package/LICENSE.md": b"MIT"}, links=("package/dist/mqtt.min.js",)),
            "package/dist/mqtt.min.js is not a regular file",
        ),
        (b"not a tarball", "cannot be read"),
    ],
)
def test_extract_refuses_a_tarball_without_the_files(tmp_path: Path, data: bytes, error: str) -> None:
    with pytest.raises(VendorError, match=error):
        extract(data, tmp_path / "vendor")
    assert not (tmp_path / "vendor").exists()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server standing in for the registry: (base URL, directory it serves)."""
    root = tmp_path / "registry"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_install_downloads_verifies_and_extracts(registry: tuple[str, Path], tmp_path: Path) -> None:
    base, root = registry
    data = _tarball(PACKAGE)
    (root / "mqtt.tgz").write_bytes(data)
    dest = tmp_path / "vendor"
    install(dest, f"{base}/mqtt.tgz", _integrity(data))
    assert (dest / BUNDLE).read_bytes() == PACKAGE["package/dist/mqtt.min.js"]


def test_install_writes_nothing_when_the_digest_differs(registry: tuple[str, Path], tmp_path: Path) -> None:
    base, root = registry
    (root / "mqtt.tgz").write_bytes(_tarball(PACKAGE))
    dest = tmp_path / "vendor"
    with pytest.raises(VendorError, match="integrity mismatch"):
        install(dest, f"{base}/mqtt.tgz")  # the pinned digest: not this tarball's
    assert not dest.exists()


def test_install_names_the_url_it_could_not_download(registry: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = registry
    with pytest.raises(VendorError, match=f"cannot download {base}/missing.tgz"):
        install(tmp_path / "vendor", f"{base}/missing.tgz")


def test_the_pinned_tarball_is_npm_s_own_address() -> None:
    assert tarball_url() == f"https://registry.npmjs.org/mqtt/-/mqtt-{MQTT_VERSION}.tgz"
