"""The audit log is append-only in the database itself, and the role groups exist."""

from django.db import migrations

APPEND_ONLY_SQL = """
CREATE OR REPLACE FUNCTION worklist_auditevent_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'worklist_auditevent is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER worklist_auditevent_no_update_or_delete
    BEFORE UPDATE OR DELETE ON worklist_auditevent
    FOR EACH ROW EXECUTE FUNCTION worklist_auditevent_append_only();
"""

DROP_SQL = """
DROP TRIGGER IF EXISTS worklist_auditevent_no_update_or_delete ON worklist_auditevent;
DROP FUNCTION IF EXISTS worklist_auditevent_append_only();
"""

ROLES = ("ed_physician", "radiologist", "admin")


def create_role_groups(apps, schema_editor):
    group_model = apps.get_model("auth", "Group")
    for role in ROLES:
        group_model.objects.get_or_create(name=role)


class Migration(migrations.Migration):
    dependencies = [
        ("worklist", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [
        migrations.RunSQL(APPEND_ONLY_SQL, DROP_SQL),
        migrations.RunPython(create_role_groups, migrations.RunPython.noop),
    ]
