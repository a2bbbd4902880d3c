import csv
import io

import pytest
from django.db import connection, transaction
from django.db.utils import DatabaseError
from django.test import Client
from django.urls import reverse

from tests.factories import AIResultFactory, FindingFactory, InstanceFactory, StudyFactory
from worklist.models import AuditAction, AuditEvent

pytestmark = pytest.mark.django_db


def _actions() -> list[str]:
    return list(AuditEvent.objects.order_by("id").values_list("action", flat=True))


class TestTheAuditLogIsAppendOnly:
    def test_a_raw_sql_update_is_refused_by_the_database(self) -> None:
        event = AuditEvent.objects.create(action=AuditAction.LOGIN, username="alice")
        with (
            pytest.raises(DatabaseError, match="append-only"),
            transaction.atomic(),
            connection.cursor() as cursor,
        ):
            cursor.execute(
                "UPDATE worklist_auditevent SET username = 'mallory' WHERE id = %s", [event.pk]
            )
        event.refresh_from_db()
        assert event.username == "alice"

    def test_a_raw_sql_delete_is_refused_by_the_database(self) -> None:
        event = AuditEvent.objects.create(action=AuditAction.LOGIN, username="alice")
        with (
            pytest.raises(DatabaseError, match="append-only"),
            transaction.atomic(),
            connection.cursor() as cursor,
        ):
            cursor.execute("DELETE FROM worklist_auditevent WHERE id = %s", [event.pk])
        assert AuditEvent.objects.filter(pk=event.pk).exists()

    def test_the_orm_cannot_edit_an_event_either(self) -> None:
        event = AuditEvent.objects.create(action=AuditAction.LOGIN, username="alice")
        event.username = "mallory"
        with pytest.raises(DatabaseError), transaction.atomic():
            event.save()


class TestLoginAndLogoutAreAudited:
    def test_a_login_writes_one_event_with_the_client_address(self, user_with_role) -> None:
        user_with_role("ed_physician", username="alice")
        response = Client(REMOTE_ADDR="10.1.2.3").post(
            reverse("login"), {"username": "alice", "password": "correct-horse-battery-9"}
        )
        assert response.status_code == 302
        event = AuditEvent.objects.get()
        assert (event.action, event.username, event.client_address) == (
            AuditAction.LOGIN,
            "alice",
            "10.1.2.3",
        )

    def test_a_failed_login_is_audited_with_the_name_typed(self, user_with_role) -> None:
        user_with_role("ed_physician", username="alice")
        response = Client().post(reverse("login"), {"username": "alice", "password": "wrong"})
        assert response.status_code == 200
        event = AuditEvent.objects.get()
        assert (event.action, event.username, event.user) == (
            AuditAction.LOGIN_FAILED,
            "alice",
            None,
        )

    def test_a_logout_is_audited_and_ends_the_session(self, ed_client: Client) -> None:
        assert ed_client.post(reverse("logout")).status_code == 302
        assert _actions() == [AuditAction.LOGOUT]
        assert ed_client.get(reverse("api-study-list")).status_code == 401


class TestPatientDataAccessIsAudited:
    def test_viewing_the_worklist_writes_one_event(self, ed_client: Client) -> None:
        StudyFactory.create_batch(3)
        assert ed_client.get(reverse("api-study-list")).status_code == 200
        assert _actions() == [AuditAction.WORKLIST_VIEWED]

    def test_opening_a_study_writes_an_event_linked_to_it(self, ed_client: Client) -> None:
        study = StudyFactory()
        response = ed_client.get(reverse("api-study-detail", args=[study.pk]))
        assert response.status_code == 200
        assert response.json()["study_instance_uid"] == study.study_instance_uid
        event = AuditEvent.objects.get()
        assert (event.action, event.study, event.object_id) == (
            AuditAction.STUDY_OPENED,
            study,
            str(study.pk),
        )

    def test_fetching_an_image_writes_an_event(self, ed_client: Client, settings) -> None:
        instance = InstanceFactory(path="studies/a/1.dcm")
        stored = settings.MEDIA_ROOT / "studies/a/1.dcm"
        stored.parent.mkdir(parents=True)
        stored.write_bytes(b"DICM-bytes")
        response = ed_client.get(reverse("api-instance", args=[instance.pk]))
        assert b"".join(response.streaming_content) == b"DICM-bytes"
        event = AuditEvent.objects.get()
        assert (event.action, event.study) == (AuditAction.IMAGES_FETCHED, instance.series.study)

    def test_a_missing_study_is_a_404_and_not_audited(self, ed_client: Client) -> None:
        assert ed_client.get(reverse("api-study-detail", args=[999999])).status_code == 404
        assert _actions() == []

    def test_a_result_image_that_is_not_there_is_a_404_and_not_audited(
        self, ed_client: Client, settings
    ) -> None:
        result = AIResultFactory(
            heatmaps={"any": {"1.2.3": "results/1/heatmaps/any/0000.png"}},  # never written
            prediction_basis={"any": [{"image": "results/1/basis/any/0.png"}]},
        )
        for kind, key in (("heatmaps", "1.2.3"), ("basis", "0"), ("basis", "\u00b2")):
            url = reverse("api-result-image", args=[result.pk, kind, "any", key])
            response = ed_client.get(url)
            assert response.status_code == 404, (kind, key, response.content)
        assert _actions() == []


class TestReviewsAreAudited:
    def test_confirming_a_finding_saves_the_review_and_one_event(
        self, radiologist_client: Client
    ) -> None:
        finding = FindingFactory()
        response = radiologist_client.post(
            reverse("api-finding-review", args=[finding.pk]),
            {"decision": "confirmed", "comment": "agree"},
            content_type="application/json",
        )
        assert response.status_code == 201, response.content
        assert response.json()["decision"] == "confirmed"
        event = AuditEvent.objects.get()
        assert event.action == AuditAction.REVIEW_SAVED
        assert event.details == {"decision": "confirmed", "class": "subdural"}
        finding.result.study.refresh_from_db()
        assert finding.result.study.review_state == "reviewed"

    def test_a_missed_finding_is_recorded_against_the_study(
        self, radiologist_client: Client
    ) -> None:
        study = AIResultFactory().study
        response = radiologist_client.post(
            reverse("api-missed-finding", args=[study.pk]),
            {"haemorrhage_class": "epidural"},
            content_type="application/json",
        )
        assert response.status_code == 201
        assert response.json()["decision"] == "missed"
        assert _actions() == [AuditAction.REVIEW_SAVED]

    def test_an_invalid_decision_is_refused_and_nothing_is_written(
        self, radiologist_client: Client
    ) -> None:
        finding = FindingFactory()
        response = radiologist_client.post(
            reverse("api-finding-review", args=[finding.pk]),
            {"decision": "maybe"},
            content_type="application/json",
        )
        assert response.status_code == 400
        assert "decision" in response.json()
        assert _actions() == []


class TestAdminsReadAndExportTheLog:
    def test_the_log_filters_by_user_study_action_and_time(self, admin_client_: Client) -> None:
        study = StudyFactory()
        AuditEvent.objects.create(action=AuditAction.STUDY_OPENED, username="bob", study=study)
        AuditEvent.objects.create(action=AuditAction.STUDY_OPENED, username="carol", study=study)
        AuditEvent.objects.create(action=AuditAction.LOGIN, username="bob")
        url = reverse("api-audit-list")

        def usernames(**query: str) -> list[str]:
            response = admin_client_.get(url, query)
            assert response.status_code == 200, response.content
            return sorted(row["username"] for row in response.json()["results"])

        assert usernames(username="bob") == ["bob", "bob"]
        assert usernames(study=study.study_instance_uid) == ["bob", "carol"]
        assert usernames(study=str(study.pk), username="carol") == ["carol"]
        assert usernames(action="auth.login") == ["bob"]
        assert usernames(since="2999-01-01T00:00:00Z") == []

    def test_a_bad_filter_is_a_400_that_names_it(self, admin_client_: Client) -> None:
        response = admin_client_.get(reverse("api-audit-list"), {"since": "yesterday"})
        assert response.status_code == 400
        assert "since" in response.json()

    def test_the_csv_export_holds_the_filtered_rows_and_is_itself_audited(
        self, admin_client_: Client
    ) -> None:
        AuditEvent.objects.create(action=AuditAction.LOGIN, username="bob")
        AuditEvent.objects.create(action=AuditAction.LOGIN, username="carol")
        response = admin_client_.get(reverse("api-audit-export"), {"username": "bob"})
        assert response["Content-Type"] == "text/csv"
        rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
        assert [row["username"] for row in rows] == ["bob"]
        export = AuditEvent.objects.filter(action=AuditAction.EXPORT).get()
        assert export.details["filters"] == {"username": "bob"}

    def test_the_admin_site_can_export_selected_events(self, admin_client_: Client) -> None:
        event = AuditEvent.objects.create(action=AuditAction.LOGIN, username="bob")
        response = admin_client_.post(
            reverse("admin:worklist_auditevent_changelist"),
            {"action": "export_csv", "_selected_action": [event.pk]},
        )
        assert response.status_code == 200
        body = b"".join(response.streaming_content).decode()
        assert "bob" in body
        assert AuditEvent.objects.filter(action=AuditAction.EXPORT).count() == 1

    def test_the_admin_site_offers_no_way_to_delete_an_event(self, admin_client_: Client) -> None:
        event = AuditEvent.objects.create(action=AuditAction.LOGIN, username="bob")
        url = reverse("admin:worklist_auditevent_delete", args=[event.pk])
        assert admin_client_.post(url, {"post": "yes"}).status_code == 403
        assert AuditEvent.objects.filter(pk=event.pk).exists()

    @pytest.mark.parametrize("written", ["{pk}", "+{pk}", "0_{pk}", "{pk}%20"])
    def test_the_admin_audits_a_study_it_shows_however_its_id_is_written(
        self, admin_client_: Client, written: str
    ) -> None:
        study = StudyFactory()
        url = f"/admin/worklist/study/{written.format(pk=study.pk)}/change/"
        response = admin_client_.get(url)
        assert response.status_code == 200  # the study and its PHI are shown
        (event,) = AuditEvent.objects.filter(action=AuditAction.STUDY_OPENED)
        assert event.study == study

    def test_an_admin_who_is_not_a_superuser_cannot_make_anyone_one(
        self, admin_client_: Client
    ) -> None:
        from django.contrib.auth import get_user_model

        me = get_user_model().objects.get(pk=admin_client_.session["_auth_user_id"])
        assert not me.is_superuser
        url = reverse("admin:auth_user_change", args=[me.pk])
        page = admin_client_.get(url).content.decode()
        assert 'name="is_superuser"' not in page and 'name="user_permissions"' not in page
        form = {
            "username": me.username,
            "is_active": "on",
            "is_staff": "on",
            "is_superuser": "on",
            "groups": list(me.groups.values_list("pk", flat=True)),
            "last_login_0": "",
            "last_login_1": "",
            "date_joined_0": "2026-01-01",
            "date_joined_1": "00:00:00",
        }
        admin_client_.post(url, form)
        me.refresh_from_db()
        assert not me.is_superuser


class TestRefusalsAndReadingTheLogAreAudited:
    def test_a_logged_in_user_refused_for_their_role_is_audited_without_the_query(
        self, ed_client: Client
    ) -> None:
        response = ed_client.get(reverse("api-audit-list"), {"username": "DOE^JANE"})
        assert response.status_code == 403
        (event,) = AuditEvent.objects.all()
        assert event.action == AuditAction.ACCESS_DENIED
        assert event.user is not None and event.username == event.user.username
        assert event.client_address == "127.0.0.1"
        assert event.details == {"channel": "http", "method": "GET", "path": "/api/audit/events/"}
        assert "DOE" not in str(event.details)

    def test_a_write_refused_to_a_user_without_a_role_is_audited(self, client_as) -> None:
        finding_url = reverse("api-finding-review", args=[1])
        assert client_as(None).post(finding_url, {"decision": "confirmed"}).status_code == 403
        (event,) = AuditEvent.objects.all()
        assert (event.action, event.details["method"]) == (AuditAction.ACCESS_DENIED, "POST")

    def test_an_anonymous_refusal_names_nobody_and_is_not_written(self) -> None:
        assert Client().get(reverse("api-audit-list")).status_code == 401
        assert not AuditEvent.objects.exists()

    def test_an_allowed_request_writes_no_refusal(self, ed_client: Client) -> None:
        assert ed_client.get(reverse("api-study-list")).status_code == 200
        assert _actions() == [AuditAction.WORKLIST_VIEWED]

    def test_reading_the_log_through_the_api_is_audited_with_its_filters(
        self, admin_client_: Client
    ) -> None:
        response = admin_client_.get(reverse("api-audit-list"), {"username": "bob"})
        assert response.status_code == 200
        (event,) = AuditEvent.objects.all()
        assert event.action == AuditAction.AUDIT_VIEWED
        assert event.details == {"what": "api", "filters": {"username": "bob"}}

    def test_a_refused_filter_reads_nothing_and_writes_nothing(self, admin_client_: Client) -> None:
        assert admin_client_.get(reverse("api-audit-list"), {"since": "x"}).status_code == 400
        assert not AuditEvent.objects.exists()

    def test_reading_the_log_in_the_admin_is_audited_and_a_search_is_not_copied(
        self, admin_client_: Client
    ) -> None:
        url = reverse("admin:worklist_auditevent_changelist")
        response = admin_client_.get(url, {"q": "DOE^JANE", "action__exact": "auth.login"})
        assert response.status_code == 200
        (event,) = AuditEvent.objects.filter(action=AuditAction.AUDIT_VIEWED)
        assert event.details == {
            "what": "admin list",
            "filters": {"q": "(given)", "action__exact": "auth.login"},
        }

    def test_opening_one_event_in_the_admin_is_audited(self, admin_client_: Client) -> None:
        shown = AuditEvent.objects.create(action=AuditAction.LOGIN, username="bob")
        url = reverse("admin:worklist_auditevent_change", args=[shown.pk])
        assert admin_client_.get(url).status_code == 200
        (event,) = AuditEvent.objects.filter(action=AuditAction.AUDIT_VIEWED)
        assert event.details == {"what": "admin event", "filters": {"id": str(shown.pk)}}
