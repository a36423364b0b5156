"""The ``KEYGATE`` setting, read once per change of Django's settings.

All keys are optional::

    KEYGATE = {
        # The gateway's [upstream] identity_secret: a list, or one string (secrets separated by
        # commas or newlines), or a file holding them, one per line. With either set, every
        # request's identity must carry a valid signature.
        "IDENTITY_SECRETS": [],
        "IDENTITY_SECRET_FILE": None,
        # Seconds a signature stays valid, either side of now.
        "MAX_AGE": 300,
        # Each signature is accepted once, remembered in this cache (an alias in CACHES), or None.
        "REPLAY_CACHE": None,
        # The User field X-Api-Key-Owner is looked up by ("pk", "username", ...), or None to
        # never look one up.
        "OWNER_FIELD": "pk",
        # Without secrets: the addresses identity headers are believed from (REMOTE_ADDR).
        "GATEWAY_ADDRESSES": ["127.0.0.1", "::1"],
        # Header names, if the gateway's [auth] renames them.
        "ID_HEADER": "X-Api-Key-Id",
        "NAME_HEADER": "X-Api-Key-Name",
        "OWNER_HEADER": "X-Api-Key-Owner",
        "SIGNATURE_HEADER": "X-Keygate-Signature",
        "REQUEST_ID_HEADER": "X-Request-Id",
    }
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

from keygate_django.signature import parse_secrets

DEFAULTS = {
    "IDENTITY_SECRETS": [],
    "IDENTITY_SECRET_FILE": None,
    "MAX_AGE": 300,
    "REPLAY_CACHE": None,
    "OWNER_FIELD": "pk",
    "GATEWAY_ADDRESSES": ["127.0.0.1", "::1"],
    "ID_HEADER": "X-Api-Key-Id",
    "NAME_HEADER": "X-Api-Key-Name",
    "OWNER_HEADER": "X-Api-Key-Owner",
    "SIGNATURE_HEADER": "X-Keygate-Signature",
    "REQUEST_ID_HEADER": "X-Request-Id",
}


def _meta_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


@dataclass(frozen=True)
class Conf:
    secrets: tuple[bytes, ...]
    max_age: int
    replay_cache: str | None
    owner_field: str | None
    gateway_addresses: frozenset[str]
    id_meta: str
    name_meta: str
    owner_meta: str
    signature_meta: str
    request_id_meta: str


@lru_cache(maxsize=1)
def get() -> Conf:
    raw = getattr(settings, "KEYGATE", {})
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise ImproperlyConfigured(
            f"KEYGATE: unknown keys {sorted(unknown)}; expected some of {sorted(DEFAULTS)}"
        )
    c = {**DEFAULTS, **raw}
    secrets: list[bytes] = []
    if c["IDENTITY_SECRETS"] and c["IDENTITY_SECRET_FILE"]:
        raise ImproperlyConfigured(
            "KEYGATE: set IDENTITY_SECRETS or IDENTITY_SECRET_FILE, not both"
        )
    try:
        if c["IDENTITY_SECRET_FILE"]:
            try:
                with open(c["IDENTITY_SECRET_FILE"], encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise ImproperlyConfigured(
                    f"KEYGATE['IDENTITY_SECRET_FILE'] = {c['IDENTITY_SECRET_FILE']!r}: "
                    f"cannot read it ({e.strerror})"
                ) from None
            secrets = parse_secrets(text)
        elif c["IDENTITY_SECRETS"]:
            secrets = parse_secrets(c["IDENTITY_SECRETS"])
    except ValueError as e:
        raise ImproperlyConfigured(f"KEYGATE: {e}") from None
    if not isinstance(c["MAX_AGE"], int) or c["MAX_AGE"] <= 0:
        raise ImproperlyConfigured(
            f"KEYGATE['MAX_AGE'] = {c['MAX_AGE']!r}: expected a number of seconds above 0"
        )
    return Conf(
        secrets=tuple(secrets),
        max_age=c["MAX_AGE"],
        replay_cache=c["REPLAY_CACHE"],
        owner_field=c["OWNER_FIELD"],
        gateway_addresses=frozenset(c["GATEWAY_ADDRESSES"]),
        id_meta=_meta_key(c["ID_HEADER"]),
        name_meta=_meta_key(c["NAME_HEADER"]),
        owner_meta=_meta_key(c["OWNER_HEADER"]),
        signature_meta=_meta_key(c["SIGNATURE_HEADER"]),
        request_id_meta=_meta_key(c["REQUEST_ID_HEADER"]),
    )


@receiver(setting_changed)
def _reload(*, setting, **kwargs):
    if setting == "KEYGATE":
        get.cache_clear()
