"""Request bodies of the sidecar, declared once: validation and the OpenAPI document both read
these declarations. Strict on purpose: a client's typo fails loudly instead of being ignored."""

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from quota_common.codes import invalid
from quota_common.keys import is_valid_id

METADATA_KEYS_MAX = 16
METADATA_KEY_CHARS_MAX = 64
METADATA_VALUE_CHARS_MAX = 256
TOKENS_MAX = 10**9
REASON_CHARS_MAX = 500

Kind = Literal["id", "int", "metadata", "text"]


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: Kind
    required: bool
    low: int = 0
    high: int = TOKENS_MAX
    doc: str = ""


def check_id(value: object, name: str) -> str:
    if not is_valid_id(value):
        raise invalid(f"{name} must be 1-128 characters of A-Z a-z 0-9 . _ : @ -")
    return value


def _check_int(value: object, spec: Field) -> int:
    # bool is an int in Python; JSON true is not a token count.
    if type(value) is not int:
        raise invalid(f"{spec.name} must be a JSON integer")
    if not spec.low <= value <= spec.high:
        raise invalid(f"{spec.name} must be between {spec.low} and {spec.high}")
    return value


def _check_metadata(value: object) -> str:
    """Returns the metadata as compact JSON text, the form the Lua scripts store."""
    if not isinstance(value, dict):
        raise invalid("metadata must be an object of string values")
    if len(value) > METADATA_KEYS_MAX:
        raise invalid(f"metadata may have at most {METADATA_KEYS_MAX} keys")
    for key, item in value.items():
        if not 1 <= len(key) <= METADATA_KEY_CHARS_MAX:
            raise invalid(f"metadata keys must be 1-{METADATA_KEY_CHARS_MAX} characters")
        if "\x00" in key:
            raise invalid("metadata keys must not contain NUL characters")
        if not isinstance(item, str) or len(item) > METADATA_VALUE_CHARS_MAX or "\x00" in item:
            raise invalid(
                f"metadata.{key} must be a string of at most {METADATA_VALUE_CHARS_MAX} characters"
                " without NUL"
            )
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode() if value else ""


def _check_text(value: object, spec: Field) -> str:
    # Postgres text cannot hold NUL; other control characters only garble the audit log.
    if (
        not isinstance(value, str)
        or not 1 <= len(value.strip()) <= REASON_CHARS_MAX
        or any(ord(c) < 32 and c not in "\t\n\r" for c in value)
    ):
        raise invalid(
            f"{spec.name} must be a non-empty string of at most {REASON_CHARS_MAX} characters"
            " without control characters"
        )
    return value.strip()


def validate(body: object, fields: tuple[Field, ...]) -> dict[str, Any]:
    """The body's fields checked against their declarations; absent optional fields are None
    (metadata: '')."""
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    names = {spec.name for spec in fields}
    unknown = [key for key in body if key not in names]
    if unknown:
        raise invalid(f"unknown field: {sorted(unknown)[0]}")
    values: dict[str, Any] = {}
    for spec in fields:
        if spec.name not in body:
            if spec.required:
                raise invalid(f"{spec.name} is required")
            values[spec.name] = "" if spec.kind == "metadata" else None
            continue
        value = body[spec.name]
        if value is None:
            # null is not "absent": a client sending it has a bug worth hearing about.
            raise invalid(f"{spec.name} must not be null (leave it out instead)")
        elif spec.kind == "id":
            values[spec.name] = check_id(value, spec.name)
        elif spec.kind == "int":
            values[spec.name] = _check_int(value, spec)
        elif spec.kind == "metadata":
            values[spec.name] = _check_metadata(value)
        else:
            values[spec.name] = _check_text(value, spec)
    return values


USER = Field("user_id", "id", True, doc="The user whose quota is used.")
RESERVATION = Field("reservation_id", "id", True, doc="Chosen by the client so retries replay.")
METADATA = Field(
    "metadata",
    "metadata",
    False,
    doc="Flat object of at most 16 string values (conversation_id, model, ...).",
)
TTL = Field("ttl_s", "int", False, 1, 3600, "Seconds the hold lives (default RESERVATION_TTL_S).")

RESERVE = (
    USER,
    Field("tokens", "int", True, 1, TOKENS_MAX, "Tokens the LLM call may use."),
    Field("reservation_id", "id", False, doc="Optional; the sidecar makes one when absent."),
    TTL,
    Field("min_tokens", "int", False, 1, TOKENS_MAX, "Smallest partial grant accepted."),
    METADATA,
)
EXTEND = (
    RESERVATION,
    USER,
    Field("tokens", "int", True, 1, TOKENS_MAX, "The hold's new total."),
    TTL,
)
COMMIT = (
    RESERVATION,
    USER,
    Field("tokens", "int", True, 0, TOKENS_MAX, "Tokens really used."),
    METADATA,
)
REFUND = (RESERVATION, USER)
RESET = (Field("reason", "text", True, doc="Why, for the audit log."),)
CREDITS = (
    Field("tokens", "int", True, 1, TOKENS_MAX, "One-off tokens added to this period's limit."),
    Field("reason", "text", True, doc="Why, for the audit log."),
)
