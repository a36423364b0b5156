from django.contrib.auth import get_user_model
from django.http import JsonResponse
from rest_framework import generics, serializers
from rest_framework.permissions import AllowAny, IsAdminUser, IsAuthenticated
from rest_framework.response import Response
from rest_framework.throttling import UserRateThrottle
from rest_framework.views import APIView

from keygate_django.permissions import IsOwnerUser
from widgets.models import Widget


class WhoAmI(APIView):
    def get(self, request):
        user = request.user
        return Response(
            {
                "pk": str(user.pk),
                "username": user.get_username(),
                "is_staff": user.is_staff,
                "is_user": isinstance(user, get_user_model()),
                "key_id": request.auth.key_id,
                "key_name": request.auth.key_name,
                "owner": request.auth.owner,
                "signed": request.auth.signed,
            }
        )


class WidgetSerializer(serializers.ModelSerializer):
    class Meta:
        model = Widget
        fields = ["id", "name"]


class MyWidgets(generics.ListAPIView):
    """A per-user queryset, as the app had it."""

    serializer_class = WidgetSerializer
    permission_classes = [IsAuthenticated, IsOwnerUser]

    def get_queryset(self):
        return Widget.objects.filter(owner=self.request.user).order_by("name")


class AdminOnly(APIView):
    permission_classes = [IsAdminUser]

    def get(self, request):
        return Response({"admin": request.user.get_username()})


class Throttled(APIView):
    throttle_classes = [UserRateThrottle]

    def get(self, request):
        return Response({"pk": str(request.user.pk)})


class Public(APIView):
    permission_classes = [AllowAny]

    def get(self, request):
        return Response({"authenticated": bool(request.user and request.user.is_authenticated)})


def plain(request):
    """A plain Django view: request.user comes from KeygateIdentityMiddleware."""
    return JsonResponse(
        {
            "authenticated": request.user.is_authenticated,
            "username": request.user.get_username() if request.user.is_authenticated else None,
        }
    )


class Echo(APIView):
    """The identity headers as received: lets tests/django.rs replay what keygate sent."""

    def get(self, request):
        names = ["X-Keygate-Signature", "X-Request-Id", "X-Api-Key-Id", "X-Api-Key-Name", "X-Api-Key-Owner"]
        return Response({name: request.headers.get(name) for name in names})
