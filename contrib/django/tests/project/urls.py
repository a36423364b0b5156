from django.urls import path

from widgets import views

urlpatterns = [
    path("api/whoami/", views.WhoAmI.as_view()),
    path("api/widgets/", views.MyWidgets.as_view()),
    path("api/admin-only/", views.AdminOnly.as_view()),
    path("api/throttled/", views.Throttled.as_view()),
    path("api/public/", views.Public.as_view()),
    path("api/echo/", views.Echo.as_view()),
    path("plain/", views.plain),
]
