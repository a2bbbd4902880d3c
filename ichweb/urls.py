from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from worklist import views
from worklist.admin import admin_site
from worklist.roles import IsEdPhysician

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("accounts/login/", views.LoginView.as_view(), name="login"),
    path("accounts/logout/", views.logout, name="logout"),
    path("admin/", admin_site.urls),
    path("api/", include("worklist.urls")),
    path("dicomweb/", include("worklist.dicomweb")),
    path(
        "api/schema/",
        SpectacularAPIView.as_view(permission_classes=[IsEdPhysician]),
        name="schema",
    ),
    path(
        "api/docs/",
        SpectacularSwaggerView.as_view(url_name="schema", permission_classes=[IsEdPhysician]),
        name="api-docs",
    ),
]
