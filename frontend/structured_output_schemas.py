"""Request fields that constrain the output: OpenAI's `response_format`, LMDeploy's
`regex_schema` form of it, vLLM's `structured_outputs` and its older `guided_*` fields.
Imported by frontend/schemas.py; frontend/structured_output.py turns them into a Grammar."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

JSONSchemaDict = Annotated[dict[str, Any], Meta(description="a JSON schema")]
Choices = Annotated[list[str], Meta(min_length=1, description="the output is one of these")]


class ResponseFormatText(msgspec.Struct, tag_field="type", tag="text", kw_only=True):
    """Plain text: no constraint."""


class ResponseFormatJSONObject(msgspec.Struct, tag_field="type", tag="json_object", kw_only=True):
    """Any JSON object."""


class JSONSchemaFormat(msgspec.Struct, kw_only=True):
    name: str | None = None  # OpenAI requires it; vLLM and LMDeploy do not
    description: str | None = None
    schema: Annotated[
        JSONSchemaDict | None, Meta(description="the output's JSON schema; none: any JSON object")
    ] = None
    strict: Annotated[
        bool | None,
        Meta(description="accepted; the output always follows the schema (no extra properties)"),
    ] = None


class ResponseFormatJSONSchema(msgspec.Struct, tag_field="type", tag="json_schema", kw_only=True):
    """JSON that follows `json_schema.schema`."""

    json_schema: JSONSchemaFormat


class ResponseFormatRegex(msgspec.Struct, tag_field="type", tag="regex_schema", kw_only=True):
    """LMDeploy's: text that matches the regular expression `regex_schema`."""

    regex_schema: str


ResponseFormat = (
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema | ResponseFormatRegex
)


class StructuredOutputs(msgspec.Struct, kw_only=True):
    """vLLM's `structured_outputs`: at most one of these."""

    json: Annotated[
        JSONSchemaDict | str | None, Meta(description="a JSON schema (object or its text)")
    ] = None
    regex: str | None = None
    choice: Choices | None = None
    grammar: Annotated[str | None, Meta(description="an EBNF grammar (root rule `root`)")] = None
    json_object: Annotated[bool | None, Meta(description="true: any JSON object")] = None
