"""Checks an engine request before any generation starts, against vLLM's own schema.

vLLM publishes the JSON schema of every request it takes (FastAPI's
/openapi.json). Validating against it keeps vgate in step with the engine's
fields across vLLM versions, and, unlike vLLM (which ignores unknown fields
with a log line), refuses fields it does not know. A few ranges vLLM checks
only in code get clearer messages here first. Pure: the schema comes in.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

# The two engine requests a predict instance becomes.
COMPLETION = "CompletionRequest"
CHAT = "ChatCompletionRequest"
GENERATE = "GenerateRequest"  # vLLM's tokens-in endpoint (engines run with --enable-scale-out)
MAX_ERRORS = 16  # errors looked at to choose the one to report


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


Rule = tuple[Callable[[Any], bool], str]
POSITIVE_INT: Rule = (lambda v: _is_int(v) and v >= 1, "must be a positive integer")
PENALTY: Rule = (lambda v: _is_number(v) and -2 <= v <= 2, "must be a number in [-2, 2]")

# Field: (check, message). Null means "the engine's default" and always passes.
RANGES: dict[str, Rule] = {
    "max_tokens": POSITIVE_INT,
    "max_completion_tokens": POSITIVE_INT,
    "n": POSITIVE_INT,
    "min_tokens": (lambda v: _is_int(v) and v >= 0, "must be a non-negative integer"),
    "temperature": (lambda v: _is_number(v) and v >= 0, "must be a number >= 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "must be a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= -1, "must be an integer >= -1 (-1 or 0: off)"),
    "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "must be a number in [0, 1]"),
    "presence_penalty": PENALTY,
    "frequency_penalty": PENALTY,
    "repetition_penalty": (lambda v: _is_number(v) and v > 0, "must be a number > 0"),
}

_JSON_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def _any_of(
    validator: Draft202012Validator, any_of: list[Any], instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    """jsonschema's anyOf, but each branch stops at its first MAX_ERRORS errors and the
    message does not print the instance: a long list that fails every branch cost
    seconds of the event loop, collecting each branch's every error, nested."""
    errors: list[ValidationError] = []
    for index, branch in enumerate(any_of):
        found = list(
            itertools.islice(validator.descend(instance, branch, schema_path=index), MAX_ERRORS)
        )
        if not found:
            return
        errors.extend(found)
    yield ValidationError("is not valid under any of the given schemas", context=errors)


_Validator = validators.extend(Draft202012Validator, {"anyOf": _any_of})


class RequestSchemas:
    """Validators for the engine's request types, built once from its OpenAPI document."""

    def __init__(self, openapi: dict[str, Any]) -> None:
        components = openapi["components"]
        self._validators: dict[str, Draft202012Validator] = {}
        for name in (COMPLETION, CHAT):
            # Closed to unknown fields; refs resolve against the document's components.
            schema = {**components["schemas"][name], "additionalProperties": False}
            self._validators[name] = _Validator({**schema, "components": components})
        generate = components["schemas"].get(GENERATE, {}).get("properties", {})
        self.sampling_fields = frozenset(generate.get("sampling_params", {}).get("properties", {}))

    def properties(self, name: str) -> set[str]:
        return set(self._validators[name].schema["properties"])

    def problem(self, name: str, request: dict[str, Any]) -> tuple[str, str] | None:
        """(field path, what is wrong) of the first problem of `request`, or None."""
        for key, (check, message) in RANGES.items():
            value = request.get(key)
            if value is not None and not check(value):
                return key, message
        # The first few: collecting every error of a large invalid body would take
        # seconds (each anyOf branch's errors come with it), on the event loop.
        errors = list(itertools.islice(self._validators[name].iter_errors(request), MAX_ERRORS))
        if not errors:
            return None
        if any(e.validator == "additionalProperties" and not e.path for e in errors):
            extra = sorted(set(request) - self.properties(name))
            return extra[0], "unknown field" + _suggestion(extra[0], self.properties(name))
        root = self._validators[name].schema
        return _describe(min(errors, key=lambda e: len(e.absolute_path)), root)


def _suggestion(field: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(field, list(known), n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


def path_text(path: Iterable[str | int]) -> str:
    """`messages[0].content` from ["messages", 0, "content"]."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


def _types_of(schema: dict[str, Any], root: dict[str, Any]) -> list[str]:
    """JSON types a (sub)schema takes, following one $ref."""
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target.get(part, {})
        schema = target
    if "const" in schema:
        return [repr(schema["const"])]
    kind = schema.get("type")
    if isinstance(kind, list):
        return kind
    if kind:
        return [kind]
    return [t for sub in schema.get("anyOf", schema.get("oneOf", [])) for t in _types_of(sub, root)]


def _matches(value: Any, kind: str) -> bool:
    python = _JSON_TYPES.get(kind)
    if python is None or (isinstance(value, bool) and kind in ("integer", "number")):
        return False
    return isinstance(value, python)


def _describe(error: ValidationError, root: dict[str, Any]) -> tuple[str, str]:
    """A short message for one schema error; never echoes a large input back."""
    if error.validator in ("anyOf", "oneOf"):
        branches = error.validator_value
        inner = _inner_error(error, branches, root)
        if inner is not None:
            return _describe(inner, root)
        kinds = list(dict.fromkeys(t for b in branches for t in _types_of(b, root)))
        return path_text(error.absolute_path), "must be " + " or ".join(kinds)
    if error.validator == "type":
        return path_text(error.absolute_path), f"must be {error.validator_value}"
    message = error.message
    return path_text(error.absolute_path), message if len(message) <= 200 else message[:200] + "…"


def _inner_error(
    error: ValidationError, branches: list[dict[str, Any]], root: dict[str, Any]
) -> ValidationError | None:
    """When the value has the right type for some branch, the error inside that branch.

    Branches whose discriminator (a const or enum field such as "role") does not
    match are skipped; of the rest, the deepest error says the most.
    """
    fitting = {
        i
        for i, b in enumerate(branches)
        if any(_matches(error.instance, t) for t in _types_of(b, root))
    }
    by_branch: dict[int, list[ValidationError]] = {}
    for sub in error.context or []:
        if sub.schema_path and sub.schema_path[0] in fitting:
            by_branch.setdefault(sub.schema_path[0], []).append(sub)
    if not by_branch:
        return None
    keyed = {
        i: errs
        for i, errs in by_branch.items()
        if not any(e.validator in ("const", "enum") and len(e.path) == 1 for e in errs)
    }
    candidates = [e for errs in (keyed or by_branch).values() for e in errs]
    deepest = max(candidates, key=lambda e: len(e.path))
    if deepest.validator == "type" and not deepest.path:
        return None  # the value itself is of a wrong type: the caller lists the types
    return deepest
