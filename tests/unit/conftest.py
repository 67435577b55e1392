"""Unit fixtures: vLLM's request schemas, made from its own models as its server does."""

from __future__ import annotations

import pytest
from pydantic.json_schema import models_json_schema

from gateway.predict.validation import RequestSchemas


@pytest.fixture(scope="session")
def schemas() -> RequestSchemas:
    """What the gateway reads from an engine's /openapi.json, without starting one."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateRequest

    _, document = models_json_schema(
        [
            (CompletionRequest, "validation"),
            (ChatCompletionRequest, "validation"),
            (GenerateRequest, "validation"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    return RequestSchemas({"components": {"schemas": document["$defs"]}})
