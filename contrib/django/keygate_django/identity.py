"""The identity keygate forwards, verified, and the user it stands for."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db.models.manager import EmptyManager

from keygate_django import conf
from keygate_django.signature import SignatureError, verify

logger = logging.getLogger("keygate_django")


class IdentityRefused(Exception):
    """Identity headers that did not come from keygate (or came too late, or twice)."""


@dataclass(frozen=True)
class Identity:
    """Which key authenticated the request, as keygate said (and signed)."""

    key_id: str
    key_name: str
    owner: str | None
    #: True when the signature was checked; False when believed from GATEWAY_ADDRESSES.
    signed: bool

    def __str__(self) -> str:
        return self.key_name or self.key_id


class KeygateClient:
    """``request.user`` for a key whose owner is no user here: what DRF's permissions and
    throttles read (``pk``, ``is_authenticated``, ``is_staff``, ...), with no database row.
    Its ``pk`` is the key's id, so ``UserRateThrottle`` counts per key."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False

    def __init__(self, identity: Identity):
        self.identity = identity
        self.pk = self.id = identity.key_id
        self.username = identity.key_name or identity.key_id

    def __str__(self) -> str:
        return self.username

    def __repr__(self) -> str:
        return f"<KeygateClient {self.pk}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, KeygateClient) and other.pk == self.pk

    def __hash__(self) -> int:
        return hash(self.pk)

    def get_username(self) -> str:
        return self.username

    @property
    def groups(self):
        from django.contrib.auth.models import Group

        return EmptyManager(Group)

    @property
    def user_permissions(self):
        from django.contrib.auth.models import Permission

        return EmptyManager(Permission)

    def has_perm(self, perm, obj=None) -> bool:
        return False

    def has_perms(self, perm_list, obj=None) -> bool:
        return False

    def has_module_perms(self, app_label) -> bool:
        return False

    def get_all_permissions(self, obj=None) -> set:
        return set()

    def get_group_permissions(self, obj=None) -> set:
        return set()

    def get_user_permissions(self, obj=None) -> set:
        return set()


def _latin1(value: str) -> bytes:
    # WSGI and ASGI servers hand header values and paths over as Latin-1 text: this gives back
    # the bytes that were received.
    return value.encode("latin-1", errors="replace")


def _received_path_and_query(request) -> tuple[bytes, bytes]:
    scope = getattr(request, "scope", None)
    if scope is not None:  # ASGI
        raw = scope.get("raw_path")
        path = unquote_to_bytes(raw.split(b"?", 1)[0]) if raw else scope["path"].encode()
        query = scope.get("query_string", b"")
        return path, query.encode("latin-1") if isinstance(query, str) else query
    meta = request.META
    path = _latin1(meta.get("SCRIPT_NAME", "")) + _latin1(meta.get("PATH_INFO", "/"))
    return path, _latin1(meta.get("QUERY_STRING", ""))


def identity_from_request(request) -> Identity | None:
    """The identity keygate sent with `request`, verified; None when it sent none. Raises
    :class:`IdentityRefused` for identity headers (or a signature) that cannot be believed."""
    c = conf.get()
    meta = request.META
    key_id = meta.get(c.id_meta, "")
    signature = meta.get(c.signature_meta)
    if not c.secrets:
        if not key_id:
            return None
        remote = meta.get("REMOTE_ADDR")
        if remote not in c.gateway_addresses:
            logger.warning(
                "keygate identity refused: %s is not a gateway address (key id %r)",
                remote,
                key_id,
            )
            raise IdentityRefused("Identity headers are accepted from the gateway only.")
        return Identity(key_id, meta.get(c.name_meta, ""), meta.get(c.owner_meta) or None, False)
    if not key_id and signature is None:
        return None  # a request that did not come through keygate, with no identity
    path, query = _received_path_and_query(request)
    try:
        parsed = verify(
            signature,
            list(c.secrets),
            now=time.time(),
            max_age=c.max_age,
            method=meta.get("REQUEST_METHOD", "GET"),
            request_id=_latin1(meta.get(c.request_id_meta, "")),
            key_id=_latin1(key_id),
            key_name=_latin1(meta.get(c.name_meta, "")),
            owner=_latin1(meta.get(c.owner_meta, "")),
            query=query,
            path=path,
        )
    except SignatureError as e:
        logger.warning(
            "keygate identity refused from %s: %s (key id %r, path %r)",
            meta.get("REMOTE_ADDR"),
            e,
            key_id,
            path,
        )
        raise IdentityRefused("Identity headers were not signed by keygate.") from None
    if c.replay_cache:
        from django.core.cache import caches

        if not caches[c.replay_cache].add(
            "keygate-signature:" + parsed.signatures[0], 1, timeout=2 * c.max_age + 1
        ):
            logger.warning(
                "keygate identity refused: signature replayed (key id %r, path %r)", key_id, path
            )
            raise IdentityRefused("Identity headers were not signed by keygate.")
    if not key_id:
        return None  # through keygate, on a public path: no key
    return Identity(key_id, meta.get(c.name_meta, ""), meta.get(c.owner_meta) or None, True)


class InactiveOwner(Exception):
    """The key's owner is a user who is not active."""


def resolve_user(identity: Identity):
    """The ``User`` the key's owner names (OWNER_FIELD), if one exists, else a
    :class:`KeygateClient`. Raises :class:`InactiveOwner` for an inactive user."""
    c = conf.get()
    if identity.owner is not None and c.owner_field:
        User = get_user_model()
        try:
            user = User._default_manager.get(**{c.owner_field: identity.owner})
        except (User.DoesNotExist, ValueError, TypeError, ValidationError):
            # No such user, or an owner that is no value of the field (a username against an
            # integer pk): the key stands for itself.
            user = None
        if user is not None:
            if not getattr(user, "is_active", True):
                raise InactiveOwner()
            return user
    return KeygateClient(identity)
