"""A PEP 503 package index on the loopback test server, and the packages tests publish on it.

``publish(srv, {"tinypkg-1.0-py3-none-any.whl": data})`` serves ``/simple/`` and ``/simple/<name>/``
(links carry the files' sha256, as PyPI's do) and the files under ``/files/``; point pip at the
returned URL with ``PIP_INDEX_URL``. ``marker_sdist`` builds an sdist whose build hooks write a
marker file, so a test can prove pip never ran it.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import zipfile
from pathlib import Path

from httpserver import FileServer


def _project(filename: str) -> str:
    stem = filename[:-7] if filename.endswith(".tar.gz") else filename.rsplit(".", 1)[0]
    name = stem.split("-", 1)[0] if filename.endswith(".whl") else stem.rpartition("-")[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def publish(srv: FileServer, files: dict[str, bytes]) -> str:
    """Serve ``files`` (file name -> bytes) as a simple index; returns the index URL."""
    projects: dict[str, list[str]] = {}
    for filename, data in files.items():
        srv.put(f"/files/{filename}", data)
        digest = hashlib.sha256(data).hexdigest()
        projects.setdefault(_project(filename), []).append(
            f'<a href="/files/{filename}#sha256={digest}">{filename}</a><br/>')
    html = {"Content-Type": "text/html"}
    for project, links in projects.items():
        body = "<!DOCTYPE html><html><body>" + "".join(links) + "</body></html>"
        srv.put(f"/simple/{project}/", body.encode(), headers=html)
    root = "".join(f'<a href="/simple/{p}/">{p}</a><br/>' for p in projects)
    srv.put("/simple/", f"<!DOCTYPE html><html><body>{root}</body></html>".encode(), headers=html)
    return srv.url("/simple/")


def wheel_bytes(name: str, version: str, members: dict[str, bytes]) -> bytes:
    """A minimal valid wheel (py3-none-any) of ``name`` holding ``members``."""
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for member, data in members.items():
            z.writestr(member, data)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{dist}/RECORD", "")
    return buf.getvalue()


def marker_sdist(name: str, version: str, marker: Path) -> bytes:
    """An sdist whose ``setup.py`` and in-tree build backend both create ``marker`` when run.

    The in-tree backend needs no build dependency, so pip could run it without any other index.
    """
    hook = f"open({str(marker)!r}, 'a').write('ran\\n')\n"
    backend = hook + (
        "def _meta(d):\n"
        "    import os\n"
        f"    p = os.path.join(d, '{name.replace('-', '_')}-{version}.dist-info')\n"
        "    os.makedirs(p, exist_ok=True)\n"
        f"    open(os.path.join(p, 'METADATA'), 'w').write('Metadata-Version: 2.1\\nName: {name}\\nVersion: "
        f"{version}\\n')\n"
        "    return os.path.basename(p)\n"
        "def get_requires_for_build_wheel(config_settings=None):\n    return []\n"
        "def prepare_metadata_for_build_wheel(d, config_settings=None):\n    return _meta(d)\n"
        "def build_wheel(d, config_settings=None, metadata_directory=None):\n    raise RuntimeError('no')\n"
        "def build_sdist(d, config_settings=None):\n    raise RuntimeError('no')\n"
    )
    pyproject = ('[build-system]\nrequires = []\nbuild-backend = "evil_backend"\nbackend-path = ["."]\n')
    top = f"{name.replace('-', '_')}-{version}"
    files = {
        "setup.py": hook + f"from setuptools import setup\nsetup(name={name!r}, version={version!r})\n",
        "evil_backend.py": backend,
        "pyproject.toml": pyproject,
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()
