"""Permission classes for views that need more than an authenticated key."""

from django.contrib.auth import get_user_model
from rest_framework.permissions import BasePermission


class IsOwnerUser(BasePermission):
    """The key belongs to a user of this app (its owner names a ``User``): for views whose
    queryset is per user (``Model.objects.filter(owner=request.user)``), which a key standing
    for itself (a :class:`~keygate_django.KeygateClient`) has no rows in."""

    message = "This API key does not belong to a user."

    def has_permission(self, request, view):
        return isinstance(request.user, get_user_model())
