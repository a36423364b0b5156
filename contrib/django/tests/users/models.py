from django.conf import settings
from django.db import models


class APIKey(models.Model):
    """The table the app authenticated with before keygate (plaintext keys), as
    `manage.py dumpdata users.APIKey` exports it for `keygate keys import`."""

    name = models.CharField(max_length=100, unique=True)
    key = models.CharField(max_length=64, unique=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="api_keys",
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used = models.DateTimeField(null=True, blank=True)
