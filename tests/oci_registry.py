"""A real OCI registry on 127.0.0.1 for tests: Debian's ``docker-registry`` (the CNCF distribution
server), started with a temporary config and storage, optionally behind htpasswd basic auth.

``.ci/run`` installs the package, so CI always runs these tests; a machine without the binary skips
them, saying why (set PIPX_LLAMA_REQUIRE_TEST_DATA=1 to make that a failure).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

BINARY_NAMES = ("docker-registry", "registry")


def registry_binary() -> str | None:
    for name in BINARY_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """A running registry: ``host`` (``127.0.0.1:PORT``), ``root`` (its storage), ``stop()``."""

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None) -> None:
        binary = registry_binary()
        if binary is None:
            msg = "Debian's docker-registry is not installed (apt-get install docker-registry)"
            if os.environ.get("PIPX_LLAMA_REQUIRE_TEST_DATA") == "1":
                pytest.fail(msg)
            pytest.skip(msg)
        self.root = workdir / "storage"
        self.root.mkdir(parents=True)
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        auth = ""
        if users:
            import bcrypt

            htpasswd = workdir / "htpasswd"
            htpasswd.write_text("".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n"
                                        for u, p in users.items()))
            auth = f"auth:\n  htpasswd:\n    realm: test-realm\n    path: {htpasswd}\n"
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: test-secret\n" + auth
        )
        self.log = open(workdir / "registry.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "serve", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                code = httpx.get(f"http://{self.host}/v2/", timeout=1).status_code
                if code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry did not start: {(workdir / 'registry.log').read_text()}")
            time.sleep(0.1)

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob (to tamper with it in a test)."""
        hexd = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
