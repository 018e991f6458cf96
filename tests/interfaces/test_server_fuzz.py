"""Schema fuzzing with schemathesis against a real server on loopback (uvicorn in a thread): for every
operation of the OpenAPI schema, bounded numbers of schema-valid and schema-invalid requests, checked for
no 5xx, documented status codes and content types, and bodies that match their documented schemas.

The server's limits are tight (64x64, 4 steps, 2 images), so what the fuzzer gets accepted runs in
milliseconds on the tiny models; the whole run stays bounded by `EXAMPLES` per operation and mode."""
import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,  # noqa: E402
                                               response_schema_conformance, status_code_conformance)

from diffusekit.interfaces.server import create_app  # noqa: E402

EXAMPLES = 15         # per operation and mode (positive, negative); an operation without inputs has one
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.timeout(300)   # a hang guard; the run takes well under a minute
def test_schemathesis_finds_no_5xx_and_no_schema_violation(models_dir, serve_in_thread):
    app = create_app(model="tiny-a", models_dir=models_dir, queue_size=2, max_pixels=64 * 64, max_steps=4,
                     max_batch_size=2, max_images=2, max_pixel_steps=64 * 64 * 4 * 2, max_input_pixels=128 * 128)
    with serve_in_thread(app) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        failures, calls = [], {"n": 0}
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

                @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy(generation_mode=mode))
                def run(case):
                    calls["n"] += 1
                    case.call_and_validate(base_url=url, checks=checks, timeout=60)

                try:
                    run()
                except Unsatisfiable:          # nothing to negate: an operation without parameters or body
                    pass
                except Exception as e:  # noqa: BLE001 - collect every operation's failure, then report them all
                    failures.append(f"{operation.method.upper()} {operation.path} [{mode.value}]: {str(e)[:1500]}")
        assert not failures, "\n\n".join(failures)
        assert calls["n"] > 150
