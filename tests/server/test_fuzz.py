"""Property-based fuzzing (Schemathesis) of every route in the served OpenAPI schema, on the tiny export.

The rule checked is A1111's: bad input gets a 4xx with the ``{"error","detail","body","errors"}`` body, never
a 500, and the server keeps serving. Schemathesis generates each route's requests from the schema, valid
(positive) and invalid (negative). A random body rarely gets past the first check of a generation route, so
there a valid base request gets up to three of its fields replaced by generated values: that reaches the
pipeline with odd samplers, sizes, seeds, scripts and settings. The limits are small so that any valid
generation is quick, and the examples are few, to keep the test to seconds.
"""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

import sdrt

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("fastapi")
from hypothesis import strategies as st  # noqa: E402

from sdrt.server import Limits, ServerOptions, create_app  # noqa: E402

ERROR_KEYS = {"error", "detail", "body", "errors"}
EXAMPLES, GENERATION_EXAMPLES = 6, 10          # per route and generation mode
DERANDOMIZE = True                             # the same examples every run
SIZE = 64


def _png(mode: str, color) -> str:
    buffer = io.BytesIO()
    Image.new(mode, (SIZE, SIZE), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE = _png("RGB", (200, 80, 20))
BASES = {            # valid requests whose fields the generated ones replace
    ("POST", "/sdapi/v1/txt2img"): {"prompt": "a fox", "width": SIZE, "height": SIZE, "steps": 2, "seed": 1},
    ("POST", "/sdapi/v1/img2img"): {"prompt": "a fox", "width": SIZE, "height": SIZE, "steps": 2, "seed": 1,
                                    "init_images": [IMAGE], "mask": _png("L", 255), "inpaint_full_res": False},
    ("POST", "/controlnet/detect"): {"controlnet_module": "canny", "controlnet_input_images": [IMAGE]},
    ("POST", "/sdapi/v1/png-info"): {"image": IMAGE},
}


@pytest.fixture(scope="module")
def fuzzed_app(tiny_export):
    options = ServerOptions(folders=(tiny_export,), runtime="onnxruntime", queue_size=4,
                            limits=Limits(max_pixels=SIZE * SIZE, max_steps=2, max_images=2, max_body_bytes=1 << 20))
    app = create_app(options, lambda folder: sdrt.load(folder, runtime="onnxruntime", progress=False))
    yield app
    app.state.service.queue.close()


def test_no_route_answers_500(fuzzed_app):
    # Schemathesis' own pytest plugin (from_fixture) fails under pytest 9 ("'Function' object has no
    # attribute '_nodeid'", schemathesis 4.32), so its strategies run under Hypothesis directly
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    failures: dict[str, str] = {}
    operations = [loaded.ok() for loaded in schema.get_all_operations()]
    for operation in operations:
        base = BASES.get((operation.method.upper(), operation.path))
        for mode in schemathesis.GenerationMode:
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode), data=st.data())
            @hypothesis.settings(max_examples=GENERATION_EXAMPLES if base else EXAMPLES, deadline=None,
                                 database=None, derandomize=DERANDOMIZE, suppress_health_check=list(hypothesis.HealthCheck),
                                 phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
            def call(case, data):
                if base is not None and isinstance(case.body, dict):
                    fields = data.draw(st.lists(st.sampled_from(sorted(case.body)), max_size=3, unique=True)
                                       if case.body else st.just([]))
                    case.body = {**base, **{k: case.body[k] for k in fields}}
                try:
                    response = case.call()
                except Exception as e:          # in-process, the app's exceptions reach the caller (its 500s)
                    failures.setdefault(f"{case.method} {case.path}", f"{e!r}\n{case.as_curl_command()}")
                    return
                json_body = "application/json" in response.headers.get("content-type", "")
                shaped = json_body and isinstance(response.json(), dict) and set(response.json()) == ERROR_KEYS
                if response.status_code >= 500 or (response.status_code >= 400 and not shaped):
                    failures.setdefault(f"{case.method} {case.path}", f"{response.status_code} {response.text[:300]}"
                                                                        f"\n{case.as_curl_command()}")
            try:
                call()
            except hypothesis.errors.Unsatisfiable:     # negative mode of a route without parameters
                assert mode == schemathesis.GenerationMode.NEGATIVE
    assert len(operations) >= 25                   # every /sdapi/v1, /controlnet and /internal route
    assert not failures, "\n\n".join(f"{route}: {what}" for route, what in failures.items())
    assert fuzzed_app.state.service.queue._worker.is_alive()        # still serving
