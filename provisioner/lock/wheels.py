"""Valid, deterministic wheels written locally.

The pip layer writes metadata-only stand-in wheels for what conda provides, and the
sample stack writes real ones; both use :func:`build_wheel`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from provisioner import fsops

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _wheel_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def build_wheel(
    out_dir: Path,
    name: str,
    version: str,
    requires: Sequence[str] = (),
    files: Mapping[str, bytes] | None = None,
    tag: str = "py3-none-any",
) -> Path:
    """Write a valid, deterministic wheel and return its path.

    ``files`` maps archive paths to contents; the default is a module
    ``<name>/__init__.py`` that sets ``__version__``. ``requires`` become
    ``Requires-Dist`` lines.
    """
    dist = _wheel_name(name)
    if files is None:
        files = {f"{dist}/__init__.py": f'__version__ = "{version}"\n'.encode()}
    info = f"{dist}-{version}.dist-info"
    plats = tag.split("-")[2]
    tags = ["-".join(t) for t in itertools.product(*(part.split(".") for part in tag.split("-")))]
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    wheel = "Wheel-Version: 1.0\nGenerator: provisioner.sample.stack\n"
    wheel += f"Root-Is-Purelib: {'true' if plats == 'any' else 'false'}\n"
    wheel += "".join(f"Tag: {t}\n" for t in tags)
    entries = dict(sorted(files.items()))
    entries[f"{info}/METADATA"] = metadata.encode()
    entries[f"{info}/WHEEL"] = wheel.encode()
    record = ""
    for path, data in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    entries[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in entries.items():
            zinfo = zipfile.ZipInfo(path, date_time=_ZIP_DATE)
            zinfo.external_attr = 0o644 << 16
            zinfo.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zinfo, data)
    out = Path(out_dir) / f"{dist}-{version}-{tag}.whl"
    out.parent.mkdir(parents=True, exist_ok=True)
    fsops.atomic_write_bytes(out, buf.getvalue())
    return out
