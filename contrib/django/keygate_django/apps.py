from django.apps import AppConfig
from django.core import checks


class KeygateConfig(AppConfig):
    name = "keygate_django"
    verbose_name = "keygate"

    def ready(self):
        from keygate_django import checks as keygate_checks

        checks.register(keygate_checks.check_settings, checks.Tags.security)
