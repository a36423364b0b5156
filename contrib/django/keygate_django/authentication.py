"""``KeygateAuthentication``: the DRF authentication class for an API behind keygate.

``request.user`` is the ``User`` that the key's owner names (``KEYGATE["OWNER_FIELD"]``, the pk
by default) when one exists, else a :class:`~keygate_django.KeygateClient` with the attributes
DRF's permissions and throttles read; ``request.auth`` is the :class:`~keygate_django.Identity`.
Works with or without :class:`~keygate_django.middleware.KeygateIdentityMiddleware` (which,
when installed, has verified the request already).
"""

from __future__ import annotations

from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import AuthenticationFailed

from keygate_django.identity import (
    IdentityRefused,
    InactiveOwner,
    identity_from_request,
    resolve_user,
)

_NOT_VERIFIED = object()


class KeygateAuthentication(BaseAuthentication):
    def authenticate(self, request):
        django_request = request._request
        identity = getattr(django_request, "keygate", _NOT_VERIFIED)
        if identity is _NOT_VERIFIED:
            try:
                identity = identity_from_request(django_request)
            except IdentityRefused as e:
                raise AuthenticationFailed(str(e)) from None
        if identity is None:
            return None  # no key: permission classes answer
        try:
            return (resolve_user(identity), identity)
        except InactiveOwner:
            raise AuthenticationFailed("User inactive or deleted.") from None

    def authenticate_header(self, request):
        # 401 rather than 403 for a request without credentials, as keygate answers.
        return 'Bearer realm="keygate"'
