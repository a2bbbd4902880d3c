from django.apps import AppConfig


class WorklistConfig(AppConfig):
    name = "worklist"
    verbose_name = "ICH worklist"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from worklist import schema  # noqa: F401 - registers the OpenAPI auth extension
