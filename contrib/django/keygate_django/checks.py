"""System checks (``manage.py check``, run at start): the ``KEYGATE`` setting is valid, and
identity is signed."""

from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from keygate_django import conf


def check_settings(app_configs=None, **kwargs):
    try:
        c = conf.get()
    except ImproperlyConfigured as e:
        return [checks.Error(str(e), id="keygate_django.E001")]
    if not c.secrets:
        return [
            checks.Warning(
                "KEYGATE has no IDENTITY_SECRETS or IDENTITY_SECRET_FILE: identity headers are "
                "believed from GATEWAY_ADDRESSES alone, so any process on those hosts can claim "
                "any key.",
                hint="Set [upstream] identity_secret in keygate and the same secret here.",
                id="keygate_django.W001",
            )
        ]
    return []
