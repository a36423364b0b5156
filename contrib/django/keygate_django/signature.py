"""The signature keygate puts on forwarded requests, rebuilt and checked.

Pure Python, no Django: the signed text is nine fields, each ended by a newline except the last::

    keygate-identity-v1
    <timestamp: Unix seconds>
    <method, upper case>
    <X-Request-Id>
    <X-Api-Key-Id, or empty>
    <X-Api-Key-Name, or empty>
    <X-Api-Key-Owner, or empty>
    <query string as received, without "?", or empty>
    <path as received, percent-decoded>

and the header is ``t=<timestamp>,v1=<hex HMAC-SHA256 of the text>`` with one ``v1=`` per secret
keygate signs with (two while its secret is rotated). A request is accepted when any ``v1=``
matches the HMAC under any secret this side holds, compared in constant time, and the timestamp is
within ``max_age`` seconds of now (either way, for clocks a little apart).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

VERSION = b"keygate-identity-v1"
MIN_SECRET_LEN = 32
MAX_SECRETS = 2

_HEX64 = re.compile(r"[0-9a-f]{64}")


class SignatureError(Exception):
    """The signature is missing, malformed, does not match, or is too old or new."""


def parse_secrets(text: str | bytes | list | tuple) -> list[bytes]:
    """Secrets as keygate reads them: one or two, separated by commas, spaces or newlines, each
    at least 32 bytes. A list or tuple is taken one secret per item. Errors never show a secret."""
    if isinstance(text, (list, tuple)):
        parts = [p.encode() if isinstance(p, str) else bytes(p) for p in text]
        parts = [p.strip() for p in parts if p.strip()]
    else:
        if isinstance(text, bytes):
            text = text.decode()
        parts = [p.encode() for p in re.split(r"[,\s]+", text) if p]
    if not parts:
        raise ValueError("no identity secret found")
    if len(parts) > MAX_SECRETS:
        raise ValueError(
            f"{len(parts)} identity secrets found, at most {MAX_SECRETS} "
            "(the current one and, while rotating, the next)"
        )
    for i, secret in enumerate(parts, 1):
        if len(secret) < MIN_SECRET_LEN:
            raise ValueError(
                f"identity secret {i} is {len(secret)} bytes, fewer than {MIN_SECRET_LEN}"
            )
    return parts


def signed_text(
    *,
    timestamp: int | str,
    method: str,
    request_id: bytes,
    key_id: bytes,
    key_name: bytes,
    owner: bytes,
    query: bytes,
    path: bytes,
) -> bytes:
    """The text keygate signs, from the request as the backend received it (`path` decoded)."""
    fields = [
        VERSION,
        str(timestamp).encode(),
        method.upper().encode("latin-1"),
        request_id,
        key_id,
        key_name,
        owner,
        query,
    ]
    return b"\n".join(fields) + b"\n" + path


def sign(secret: bytes, text: bytes) -> str:
    return hmac.new(secret, text, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ParsedHeader:
    timestamp: int
    signatures: tuple[str, ...]


def parse_header(value: str) -> ParsedHeader:
    timestamp = None
    signatures = []
    for part in value.split(","):
        name, sep, val = part.strip().partition("=")
        if not sep:
            raise SignatureError("malformed signature header")
        if name == "t":
            if not val.isascii() or not val.isdigit() or timestamp is not None:
                raise SignatureError("malformed signature timestamp")
            timestamp = int(val)
        elif name == "v1":
            if not _HEX64.fullmatch(val):
                raise SignatureError("malformed signature")
            signatures.append(val)
        # Other schemes (a later keygate's) are not this verifier's to judge.
    if timestamp is None or not signatures:
        raise SignatureError("malformed signature header")
    return ParsedHeader(timestamp, tuple(signatures))


def verify(
    header: str | None,
    secrets: list[bytes],
    *,
    now: float,
    max_age: int,
    **fields,
) -> ParsedHeader:
    """Checks `header` for the request described by `fields` (see :func:`signed_text`, without
    the timestamp). Returns the parsed header; raises :class:`SignatureError` otherwise."""
    if not header:
        raise SignatureError("the request carries no keygate signature")
    parsed = parse_header(header)
    if abs(now - parsed.timestamp) > max_age:
        raise SignatureError("the keygate signature has expired (or its clock is off)")
    text = signed_text(timestamp=parsed.timestamp, **fields)
    ok = False
    for secret in secrets:
        want = sign(secret, text)
        for got in parsed.signatures:
            # Every pair is compared, so the time taken does not say which matched.
            ok |= hmac.compare_digest(want, got)
    if not ok:
        raise SignatureError("the keygate signature does not match the request")
    return parsed
