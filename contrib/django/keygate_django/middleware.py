"""``KeygateIdentityMiddleware``: verifies the identity keygate forwards, on every request.

Put it after ``django.contrib.auth.middleware.AuthenticationMiddleware``. For a request that
carries keygate's identity it sets ``request.keygate`` (an :class:`~keygate_django.Identity`)
and ``request.user`` (the owner's ``User``, or a :class:`~keygate_django.KeygateClient`);
identity that cannot be believed (unsigned, wrongly signed, expired, replayed) is answered with
401 and a JSON ``detail``, and logged on the ``keygate_django`` logger.
"""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import JsonResponse
from django.utils.functional import SimpleLazyObject

from keygate_django.identity import (
    IdentityRefused,
    InactiveOwner,
    identity_from_request,
    resolve_user,
)


def _refused(message: str) -> JsonResponse:
    response = JsonResponse({"detail": message}, status=401)
    response["WWW-Authenticate"] = 'Bearer realm="keygate"'
    return response


class KeygateIdentityMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def _prepare(self, request):
        """None to go on, or the refusal."""
        try:
            identity = identity_from_request(request)
        except IdentityRefused as e:
            request.keygate = None
            return _refused(str(e))
        request.keygate = identity
        if identity is not None:
            def user():
                try:
                    return resolve_user(identity)
                except InactiveOwner:
                    from django.contrib.auth.models import AnonymousUser

                    return AnonymousUser()

            request.user = SimpleLazyObject(user)

            async def auser():
                return await sync_to_async(user)()

            request.auser = auser
        return None

    def __call__(self, request):
        if self.async_mode:
            return self.__acall__(request)
        return self._prepare(request) or self.get_response(request)

    async def __acall__(self, request):
        refused = self._prepare(request)
        if refused is not None:
            return refused
        return await self.get_response(request)
