"""The dashboard's MQTT.js: a pinned npm ``mqtt`` release, fetched once, checked, never committed.

``python -m bridge.dashboard.vendor`` (run by ``make install``) downloads the registry tarball
of :data:`MQTT_VERSION`, refuses it unless its sha512 matches :data:`MQTT_INTEGRITY` (the
``dist.integrity`` the npm registry publishes for that version), and extracts only the browser
bundle and its licence into :data:`VENDOR_DIR` (git-ignored), which the HTTP server serves.
After that the page needs no network: no CDN at run time.

Bumping the version: take ``dist.integrity`` from ``https://registry.npmjs.org/mqtt/<version>``
and change both constants together.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
from pathlib import Path
from typing import Final

import httpx

from bridge.errors import VendorError

__all__ = [
    "BUNDLE",
    "FILES",
    "MQTT_INTEGRITY",
    "MQTT_VERSION",
    "VENDOR_DIR",
    "extract",
    "fetch",
    "install",
    "tarball_url",
    "verify",
]

MQTT_VERSION: Final = "5.16.0"
MQTT_INTEGRITY: Final = (
    "sha512-G0VsEtuJz5sJUgZJaaADMVfW7SIFPzkIuHR+d6rk+tBeSwdCfd9BaIRycRfd2AbyFDEmLlFM+SDQeti/+IbOnw=="
)
VENDOR_DIR: Final = Path(__file__).resolve().with_name("vendor")
BUNDLE: Final = "mqtt.min.js"
# Tarball member -> file in VENDOR_DIR. Nothing else in the package is extracted.
FILES: Final = {"package/dist/mqtt.min.js": BUNDLE, "package/LICENSE.md": "LICENSE.md"}
_MAX_TARBALL: Final = 16 * 1024 * 1024
_MAX_MEMBER: Final = 4 * 1024 * 1024
_WHAT: Final = f"mqtt {MQTT_VERSION}"


def tarball_url(version: str = MQTT_VERSION) -> str:
    return f"https://registry.npmjs.org/mqtt/-/mqtt-{version}.tgz"


def verify(data: bytes, integrity: str = MQTT_INTEGRITY) -> None:
    """Raise :class:`VendorError` unless ``data`` has the ``sha512-<base64>`` digest given."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512" or not expected:
        raise VendorError(_WHAT, f"integrity {integrity!r} is not sha512-<base64>")
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if actual != expected:
        raise VendorError(_WHAT, f"integrity mismatch: expected sha512-{expected}, got sha512-{actual}")


def extract(data: bytes, dest: Path) -> list[Path]:
    """Write the :data:`FILES` members of a verified tarball into ``dest``; returns the paths.

    Members are read by exact name and written to fixed names: a tarball's own paths never
    choose where anything lands.
    """
    written: list[Path] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            contents: dict[str, bytes] = {}
            for member, name in FILES.items():
                try:
                    info = archive.getmember(member)
                except KeyError:
                    raise VendorError(_WHAT, f"the tarball has no {member}") from None
                source = archive.extractfile(info) if info.isfile() else None
                if source is None or info.size > _MAX_MEMBER:
                    raise VendorError(_WHAT, f"{member} is not a regular file under {_MAX_MEMBER} bytes")
                contents[name] = source.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise VendorError(_WHAT, f"the tarball cannot be read: {exc}") from exc
    dest.mkdir(parents=True, exist_ok=True)
    for name, body in contents.items():
        # Write then rename: a half-written bundle is never served.
        partial = dest / f".{name}.partial"
        partial.write_bytes(body)
        partial.replace(dest / name)
        written.append(dest / name)
    return written


def fetch(url: str, timeout_s: float = 60.0) -> bytes:
    try:
        response = httpx.get(url, follow_redirects=True, timeout=timeout_s)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise VendorError(_WHAT, f"cannot download {url}: {exc}") from exc
    if len(response.content) > _MAX_TARBALL:
        raise VendorError(_WHAT, f"{url} is larger than {_MAX_TARBALL} bytes")
    return response.content


def install(dest: Path = VENDOR_DIR, url: str | None = None, integrity: str = MQTT_INTEGRITY) -> list[Path]:
    """Download, verify and extract the pinned release into ``dest`` (nothing is written
    unless the whole tarball verifies)."""
    data = fetch(url or tarball_url())
    verify(data, integrity)
    return extract(data, dest)


def main() -> int:
    try:
        paths = install()
    except VendorError as exc:
        print(f"market-bridge: {exc}", file=sys.stderr)
        return 1
    print(f"{_WHAT}: {', '.join(str(p) for p in paths)} (sha512 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
