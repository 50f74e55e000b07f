"""API fuzzing with schemathesis: requests generated from the running server's own OpenAPI
schema (``/openapi.json``), sent to a live ``waldo serve`` over loopback. No request may get
a 5xx, and every response must be one the schema documents: its status, content type and
body schema. Runs on a private copy of a small real grocery index (fuzzed writes add and
delete images there).
"""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from waldo.serve.process import start_server

# The checks of robustness and of the contract. Not "positive data acceptance": the schema
# can only say that an upload is binary, so most generated uploads are (rightly) refused.
#: Examples per operation and mode: enough to hit every validation path, light on 2 cores.
EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed_server(small_index, tmp_path_factory):
    import shutil

    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(small_index.root, folder / "index")
    with start_server(folder / "index", folder / "server.log") as server:
        yield server


def _operations(url: str):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


# schemathesis's pytest plugin (schema.parametrize / from_fixture) does not run under this
# pytest (it reads a node attribute pytest 9 removed), so each operation's hypothesis strategy
# is driven here directly: the same generation and the same checks.
def test_no_request_the_schema_allows_gets_a_5xx_or_an_undocumented_answer(fuzzed_server):
    operations = _operations(fuzzed_server.url)
    assert {op.label for op in operations} >= {"POST /search", "POST /images", "DELETE /images/{image_id}",
                                               "GET /images/{image_id}", "GET /stats"}
    seen: dict[str, set[int]] = {}
    # Positive: requests the schema allows. Negative: requests that break it (wrong types,
    # out-of-range ids and k, missing fields), whose 4xx answers must match the schema too.
    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
        def fuzz(case):
            response = case.call(timeout=120)
            seen.setdefault(f"{operation.label} ({mode.value})", set()).add(response.status_code)
            try:
                case.validate_response(response, checks=CHECKS)
            except Exception:
                print(fuzzed_server.log_text()[-3000:])  # the server's traceback, if any
                raise

        try:
            fuzz()
        except Unsatisfiable:
            # GET /healthz and GET /stats take no input: there is nothing to break.
            assert mode is schemathesis.GenerationMode.NEGATIVE and not list(operation.iter_parameters()) \
                and not list(operation.body), operation.label
    print(seen)
    assert all(status < 500 for statuses in seen.values() for status in statuses), seen
