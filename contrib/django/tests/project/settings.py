"""A Django REST Framework API as a team would run it behind keygate: API-key authentication
and CORS removed from Django, keygate_django in their place. The environment (set by
tests/django.rs) points it at its database and the gateway's identity secret."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "test-project-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "rest_framework",
    "keygate_django",
    "users",
    "widgets",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "keygate_django.middleware.KeygateIdentityMiddleware",
]

ROOT_URLCONF = "project.urls"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("KEYGATE_TEST_DB", BASE_DIR / "db.sqlite3"),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["keygate_django.authentication.KeygateAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_RATES": {"user": os.environ.get("KEYGATE_TEST_USER_RATE", "5/min")},
}

# The secret file keygate signs with (tests/django.rs); the unit tests set their own.
KEYGATE = {"REPLAY_CACHE": "default"}
if os.environ.get("KEYGATE_TEST_IDENTITY_SECRET_FILE"):
    KEYGATE["IDENTITY_SECRET_FILE"] = os.environ["KEYGATE_TEST_IDENTITY_SECRET_FILE"]
else:
    KEYGATE["IDENTITY_SECRETS"] = ["test-secret-0123456789abcdef0123456789"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"keygate_django": {"handlers": ["stderr"], "level": "WARNING"}},
}
