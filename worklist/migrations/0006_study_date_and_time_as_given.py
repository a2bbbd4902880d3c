from django.db import migrations, models
from django.utils import timezone


def from_the_stored_moment(apps, schema_editor):  # type: ignore[no-untyped-def]
    """Studies stored before: their header date and time are not kept, so take the stored
    moment in the site's zone, as QIDO answered until now (new studies keep the header's)."""
    study_model = apps.get_model("worklist", "Study")
    for study in study_model.objects.exclude(study_datetime=None).iterator():
        moment = timezone.localtime(study.study_datetime)
        study.study_date = moment.date()
        study.study_time = moment.strftime("%H%M%S")
        study.save(update_fields=["study_date", "study_time"])


class Migration(migrations.Migration):
    dependencies = [
        ("worklist", "0005_audit_denied_and_viewed"),
    ]

    operations = [
        migrations.AddField(
            model_name="study",
            name="study_date",
            field=models.DateField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="study",
            name="study_time",
            field=models.CharField(blank=True, max_length=16),
        ),
        migrations.RunPython(from_the_stored_moment, migrations.RunPython.noop),
    ]
