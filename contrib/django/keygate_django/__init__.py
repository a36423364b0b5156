"""Django and Django REST Framework support for apps behind keygate.

keygate checks API keys and forwards each authenticated request with the key's identity in
``X-Api-Key-Id``, ``X-Api-Key-Name`` and ``X-Api-Key-Owner``, signed in ``X-Keygate-Signature``.
This package verifies that signature and turns the identity into ``request.user``:

- :class:`keygate_django.middleware.KeygateIdentityMiddleware` verifies every request and sets
  ``request.keygate`` (and ``request.user`` for plain Django views);
- :class:`keygate_django.authentication.KeygateAuthentication` is the DRF authentication class.

See README.md beside this package.
"""

from keygate_django.identity import Identity, KeygateClient, IdentityRefused

__all__ = ["Identity", "IdentityRefused", "KeygateClient"]
