"""Property-based API tests from the OpenAPI schema (schemathesis), with every built-in check.

Each operation gets a bounded number of generated requests, valid and invalid
(``max-examples`` below), so the module runs in well under two minutes. The checks
include: no 5xx, every status code and body conforms to the schema (so every code
the service answers is declared, with the ``ErrorResponse`` body), invalid data is
rejected, and, with keys configured, authentication is not ignored.

Random bytes in a file part are "valid" per the schema (``format: binary``) but are
not images; the positive-data check therefore accepts the documented refusals of
unusable images (413, 415, 422) besides 2xx.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from schemathesis.config import SchemathesisConfig

from locus.service.app import create_app
from locus.service.settings import Settings
from tests.modelfolder import write_model_folder

KEY = "schemathesis-key-0123456789"

_CONFIG = """
[generation]
max-examples = 25

[checks]
positive_data_acceptance.expected-statuses = ["2XX", "413", "415", "422"]
"""


def _app(model_dir: Path, **extra):
    settings = Settings(
        model_dir=model_dir,
        providers=["CPUExecutionProvider"],
        log_json=True,
        log_level="error",
        max_image_pixels=1024 * 1024,
        **extra,
    )
    return create_app(settings)


def _schema(model_dir: Path, **extra) -> schemathesis.schemas.BaseSchema:
    config = SchemathesisConfig.from_str(_CONFIG)
    app = _app(model_dir, **extra)
    # The schema is fetched with the key when keys are on (the docs are protected too).
    kwargs = {"headers": {"Authorization": f"Bearer {KEY}"}} if extra.get("api_keys") else {}
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config, **kwargs)


# A module-level schema needs the model folder before fixtures run: build it once, here.
MODEL_DIR = write_model_folder(Path(tempfile.mkdtemp(prefix="locus-schemathesis-")) / "test-linear", input_size=32)
open_schema = _schema(MODEL_DIR)
keyed_schema = _schema(MODEL_DIR, api_keys=[KEY])


@open_schema.parametrize()
def test_api_conforms_to_its_schema(case) -> None:
    case.call_and_validate()


@keyed_schema.parametrize()
def test_api_with_keys_conforms_and_enforces_auth(case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"})


def test_every_error_status_is_declared_with_the_error_body() -> None:
    schema = _app(MODEL_DIR, api_keys=[KEY]).openapi()
    assert "HTTPValidationError" not in str(schema)
    expected = {
        ("/classify", "post"): {"400", "401", "408", "413", "415", "422", "500", "503", "504"},
        ("/model", "get"): {"401", "500", "503"},
        ("/metrics", "get"): {"401", "500"},
        ("/ready", "get"): {"503"},
    }
    for (path, method), codes in expected.items():
        responses = schema["paths"][path][method]["responses"]
        assert codes <= set(responses), (path, sorted(responses))
        for code in codes - {"503"} if path == "/ready" else codes:
            ref = responses[code]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorResponse"), (path, code)


def test_schema_without_keys_declares_no_auth() -> None:
    schema = _app(MODEL_DIR).openapi()
    assert "securitySchemes" not in schema.get("components", {})
    for ops in schema["paths"].values():
        for op in ops.values():
            assert "security" not in op and "401" not in op["responses"]
