"""API keys and CORS: every route but /health and /ready needs a key when keys are on; keys never reach the logs.

Routes are enumerated from the app itself (nested routers and mounts included), so a
route added later is covered without touching this file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route

from locus.service.app import create_app
from locus.service.middleware import OPEN_PATHS
from locus.service.settings import Settings
from tests.conftest import png_uploads
from tests.service.test_hostile_input import serve

KEY_ENV = "env-key-7f3a9c1e5b2d4f60"
KEY_FILE = "file-key-c0ffee1234567890"
SECRET_LOOKING = "wrong-key-9a8b7c6d5e4f3a2b"


def _routes(routes, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(path, method) of every route of the app, walking included routers and mounts."""
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's included router
            sub_prefix = getattr(getattr(route, "include_context", None), "prefix", "") or ""
            yield from _routes(route.original_router.routes, prefix + sub_prefix)
        elif isinstance(route, Mount):
            yield prefix + route.path + "/anything.js", "GET"
        elif isinstance(route, Route) or hasattr(route, "methods"):
            for method in sorted(route.methods or {"GET"}):
                if method != "HEAD":
                    yield prefix + route.path, method


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# Locus API keys\n\n{KEY_FILE}\n")
    return path


@pytest.fixture(scope="module")
def keyed_settings(test_model_dir: Path, key_file: Path) -> Settings:
    """Settings read from the environment, as a deployment sets them."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LOCUS_API_KEYS", KEY_ENV)
    mp.setenv("LOCUS_API_KEY_FILE", str(key_file))
    mp.setenv("LOCUS_MODEL_DIR", str(test_model_dir))
    mp.setenv("LOCUS_PROVIDERS", "CPUExecutionProvider")
    mp.setenv("LOCUS_LOG_LEVEL", "debug")
    try:
        settings = Settings()
    finally:
        mp.undo()
    assert settings.all_api_keys() == [KEY_ENV, KEY_FILE]
    return settings


@pytest.fixture(scope="module")
def keyed(keyed_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(keyed_settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def files(synthetic_field: np.ndarray) -> dict:
    return png_uploads(synthetic_field)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_routes_are_enumerated(keyed):
    found = set(_routes(keyed.app.routes))
    for expected in [("/classify", "POST"), ("/model", "GET"), ("/metrics", "GET"), ("/health", "GET")]:
        assert expected in found
    for docs in ("/docs", "/redoc", "/openapi.json"):
        assert (docs, "GET") in found
    assert any(p.startswith("/static") for p, _ in found), "the offline docs' asset mount was not found"


def test_every_route_but_probes_refuses_without_a_valid_key(keyed):
    routes = sorted(set(_routes(keyed.app.routes)))
    assert len(routes) >= 9
    for path, method in routes:
        if path in OPEN_PATHS:
            continue
        for headers in (
            {},
            _bearer(SECRET_LOOKING),
            {"Authorization": f"Basic {KEY_ENV}"},
            {"Authorization": "Bearer"},
        ):
            r = keyed.request(method, path, headers=headers)
            assert r.status_code == 401, (path, method, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            body = r.json()
            assert body["error"]["code"] == "unauthorized"
            assert body["request_id"] == r.headers["x-request-id"]
        for key in (KEY_ENV, KEY_FILE):
            r = keyed.request(method, path, headers=_bearer(key))
            assert r.status_code != 401, (path, method, r.text)


def test_probes_and_unknown_paths(keyed):
    for path in sorted(OPEN_PATHS):
        assert keyed.get(path).status_code == 200
    # an unknown path does not reveal that it does not exist
    assert keyed.get("/no/such/route").status_code == 401
    assert keyed.get("/no/such/route", headers=_bearer(KEY_ENV)).status_code == 404


def test_keyed_requests_are_served(keyed, files):
    assert keyed.get("/model", headers=_bearer(KEY_FILE)).json()["name"] == "test-linear"
    r = keyed.post("/classify", files=files, headers=_bearer(KEY_ENV))
    assert r.status_code == 200 and r.json()["cell_count"] == 12
    assert keyed.get("/docs", headers=_bearer(KEY_ENV)).status_code == 200
    assert "paths" in keyed.get("/openapi.json", headers=_bearer(KEY_ENV)).json()
    r = keyed.post("/classify", files=files)
    assert r.status_code == 401


def test_keys_are_never_logged_in_process(keyed_settings, files, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(keyed_settings), raise_server_exceptions=False) as c:
        assert c.post("/classify", files=files, headers=_bearer(KEY_ENV)).status_code == 200
        assert c.get("/model", headers=_bearer(KEY_FILE)).status_code == 200
        assert c.get("/model", headers=_bearer(SECRET_LOOKING)).status_code == 401
        assert c.get("/model?x=1", headers={"Authorization": f"Token {KEY_FILE}"}).status_code == 401
    out, err = capfd.readouterr()
    logged = out + err + caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert "request_id" in err or caplog.records, "nothing was logged: the test would prove nothing"
    for secret in (KEY_ENV, KEY_FILE, SECRET_LOOKING):
        assert secret not in logged


@pytest.mark.slow
def test_keys_are_never_logged_by_the_server(test_model_dir, key_file, files, tmp_path):
    log_path = tmp_path / "server.log"
    with serve(
        test_model_dir,
        log_path=log_path,
        LOCUS_API_KEYS=KEY_ENV,
        LOCUS_API_KEY_FILE=str(key_file),
        LOCUS_LOG_LEVEL="debug",
    ) as (url, _proc):
        assert httpx.post(url + "/classify", files=files, headers=_bearer(KEY_ENV), timeout=60).status_code == 200
        assert httpx.get(url + "/metrics", headers=_bearer(KEY_FILE), timeout=10).status_code == 200
        assert httpx.get(url + "/model", headers=_bearer(SECRET_LOOKING), timeout=10).status_code == 401
        assert httpx.get(url + "/model", timeout=10).status_code == 401
    log = log_path.read_text(errors="replace")
    assert "/classify" in log and "request_id" in log, log[-2000:]
    for secret in (KEY_ENV, KEY_FILE, SECRET_LOOKING):
        assert secret not in log


# ---------------------------------------------------------------------------------------------------------------
# CORS


def test_cors_closed_by_default(test_model_dir):
    settings = Settings(model_dir=test_model_dir, providers=["CPUExecutionProvider"], log_level="warning")
    with TestClient(create_app(settings)) as c:
        r = c.get("/health", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = c.options("/classify", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers


def test_cors_open_for_configured_origins_only(test_model_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("LOCUS_CORS_ORIGINS", "https://app.example, https://lab.example")
    try:
        settings = Settings(
            model_dir=test_model_dir, providers=["CPUExecutionProvider"], log_level="warning", api_keys=[KEY_ENV]
        )
    finally:
        mp.undo()
    assert settings.cors_origins == ["https://app.example", "https://lab.example"]
    with TestClient(create_app(settings)) as c:
        good = {"Origin": "https://lab.example"}
        r = c.get("/health", headers=good)
        assert r.headers["access-control-allow-origin"] == "https://lab.example"
        # the preflight carries no credentials and is answered by CORS, not refused by the key check
        r = c.options("/classify", headers={**good, "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://lab.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        # a refusal is readable by the allowed page (so it can show the error)
        r = c.get("/model", headers=good)
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://lab.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        r = c.get("/model", headers={**good, **_bearer(KEY_ENV)})
        assert r.status_code == 200
        # a foreign origin gets nothing
        r = c.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = c.options("/classify", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
