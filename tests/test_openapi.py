"""docs/openapi.yaml, the API description /docs and /redoc render: a valid OpenAPI 3.1 document that lists
every route the front door serves and exactly the fields the code accepts, with the limits and defaults
model-config.yaml sets (read from the code and the config here, not copied)."""

from pathlib import Path

import pytest
import yaml
from openapi_spec_validator import validate

from jaiserve import api, openai_api
from jaiserve.api import FIELDS, Defaults
from jaiserve.openai_api import CHAT_FIELDS, CHAT_UNSUPPORTED, COMPLETION_FIELDS, COMPLETION_UNSUPPORTED
from jaiserve.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
SCHEMAS = SPEC["components"]["schemas"]
HANDLER = Settings.from_yaml(yaml.safe_load((ROOT / "model-config.yaml").read_text())["handler"])


def resolve(node: dict) -> dict:
    while "$ref" in node:
        node = SCHEMAS[node["$ref"].removeprefix("#/components/schemas/")]
    return node


def fields_of(name: str) -> dict:
    """A request schema's fields: its own and those of the schemas it includes with allOf."""
    schema = SCHEMAS[name]
    fields = dict(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        fields.update(resolve(part).get("properties", {}))
    return fields


def test_it_is_a_valid_openapi_3_1_document():
    validate(SPEC)  # raises on any violation of the OpenAPI 3.1 schema
    assert SPEC["openapi"].startswith("3.1")


def test_every_route_of_the_front_door_is_described_with_its_auth_and_errors():
    site = (ROOT / "deploy" / "nginx" / "jai.conf").read_text()
    routes = {"/generate": "post", "/chat": "post", "/health": "get", "/predictions/jai": "post",
              "/v1/models": "get", "/v1/models/{model}": "get", "/v1/completions": "post",
              "/v1/chat/completions": "post"}
    assert set(SPEC["paths"]) == set(routes)
    for path, method in routes.items():
        operation = SPEC["paths"][path][method]
        assert "401" in operation["responses"], path  # every route needs the key (security below)
        assert "502" in operation["responses"], path  # the front door with torchserve away
        if method == "post":
            assert {"400", "503"} <= set(operation["responses"]), path
        routed = "location /v1/ {" if path.startswith("/v1/") else f"location = {path} {{"
        assert routed in site, path  # the front door passes it on
    assert SPEC["security"] == [{"inferenceKey": []}]
    assert SPEC["components"]["securitySchemes"]["inferenceKey"] == {**SPEC["components"]["securitySchemes"][
        "inferenceKey"], "type": "http", "scheme": "bearer"}


@pytest.mark.parametrize("schema, accepted", [
    ("NativeRequest", FIELDS),
    ("CompletionRequest", COMPLETION_FIELDS + COMPLETION_UNSUPPORTED),
    ("ChatRequest", CHAT_FIELDS + CHAT_UNSUPPORTED),
])
def test_each_request_lists_exactly_the_fields_the_code_accepts(schema, accepted):
    assert set(fields_of(schema)) == set(accepted)
    # and refuses others, as the code does (unknown field: 400)
    assert SCHEMAS[schema].get("additionalProperties") is False or SCHEMAS[schema].get("unevaluatedProperties") is False


def test_modes_responses_and_limits_are_the_codes():
    native = fields_of("NativeRequest")
    assert native["mode"]["enum"] == list(api.MODES)
    assert set(SCHEMAS["NativeResponse"]["required"]) == set(
        api.completion_body(api.parse_request({"prompt": "a"}), "", "stop", 1, 0))
    assert SCHEMAS["Health"]["required"] == list(api.health_body(api.ServedModel()))
    assert resolve(native["max_tokens"])["maximum"] == HANDLER.max_tokens_limit
    assert native["prompt"]["maxLength"] == Defaults().max_prompt_chars
    assert fields_of("OpenAICommon")["n"]["maximum"] == HANDLER.max_choices
    roles = fields_of("ChatMessage")["role"]["enum"]
    assert roles == list(openai_api.ROLES)
    defaults = HANDLER.defaults
    assert resolve(native["max_tokens"])["default"] == defaults["max_tokens"]
    assert resolve(native["temperature"])["default"] == defaults["temperature"]
    assert resolve(native["top_k"])["default"] == defaults["top_k"]
    assert resolve(native["top_p"])["default"] == defaults["top_p"]
    description = SPEC["info"]["description"]
    assert f"at most {HANDLER.max_tokens_limit}" in description and f"{HANDLER.max_prompt_tokens} tokens" in description
