from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from tests.factories import (
    AIResultFactory,
    FindingFactory,
    InstanceFactory,
    SeriesFactory,
    StudyFactory,
    UserFactory,
)
from worklist.models import (
    AIResult,
    AIResultStatus,
    InvalidTransition,
    Review,
    ReviewDecision,
    Study,
    StudyStatus,
)

pytestmark = pytest.mark.django_db


def test_it_refuses_a_second_study_with_the_same_uid() -> None:
    StudyFactory(study_instance_uid="1.2.3")
    with pytest.raises(IntegrityError), transaction.atomic():
        StudyFactory(study_instance_uid="1.2.3")


def test_it_refuses_duplicate_series_and_instance_uids() -> None:
    series = SeriesFactory(series_instance_uid="1.2.4")
    InstanceFactory(series=series, sop_instance_uid="1.2.5")
    with pytest.raises(IntegrityError), transaction.atomic():
        SeriesFactory(series_instance_uid="1.2.4")
    with pytest.raises(IntegrityError), transaction.atomic():
        InstanceFactory(series=series, sop_instance_uid="1.2.5")


def test_a_study_follows_the_scoring_lifecycle() -> None:
    study = StudyFactory()
    for status in (StudyStatus.QUEUED, StudyStatus.SCORING, StudyStatus.SCORED):
        study.transition_to(status)
    study.refresh_from_db()
    assert study.status == StudyStatus.SCORED


def test_it_refuses_to_skip_from_receiving_to_scored() -> None:
    study = StudyFactory()
    with pytest.raises(InvalidTransition, match="'receiving' to 'scored'"):
        study.transition_to(StudyStatus.SCORED)
    study.refresh_from_db()
    assert study.status == StudyStatus.RECEIVING


def test_a_stale_copy_cannot_overwrite_a_newer_status() -> None:
    study = StudyFactory()
    stale = Study.objects.get(pk=study.pk)
    study.transition_to(StudyStatus.QUEUED)
    stale_target = StudyStatus.NOT_ELIGIBLE  # allowed from "receiving", which is no longer true
    with pytest.raises(InvalidTransition):
        stale.transition_to(stale_target)


def test_the_database_refuses_an_unknown_status() -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        StudyFactory(status="lost")


def test_a_result_has_at_most_one_finding_per_class() -> None:
    result = AIResultFactory()
    FindingFactory(result=result, haemorrhage_class="subdural")
    with pytest.raises(IntegrityError), transaction.atomic():
        FindingFactory(result=result, haemorrhage_class="subdural")


def test_a_probability_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        FindingFactory(probability=1.5)


def test_a_failed_result_must_say_why() -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        AIResult.objects.create(
            study=StudyFactory(),
            status=AIResultStatus.FAILED,
            model_name="m",
            model_version="1",
            finished_at=timezone.now(),
        )


def test_a_missed_finding_review_cannot_point_at_a_finding() -> None:
    finding = FindingFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        Review.objects.create(
            study=finding.result.study,
            finding=finding,
            haemorrhage_class="subdural",
            decision=ReviewDecision.MISSED,
            reviewer=UserFactory(),
        )


def test_a_study_waiting_past_the_maximum_is_overdue(settings) -> None:
    settings.ICH_MAX_WAIT_MINUTES = 30
    now = timezone.now()
    study = StudyFactory(received_at=now - timedelta(minutes=31), last_instance_at=now)
    assert study.is_overdue(now)
    assert not StudyFactory(received_at=now, last_instance_at=now).is_overdue(now)


def test_str_never_shows_patient_data() -> None:
    study = StudyFactory(patient_name="Doe^Jane", patient_id="PID42")
    assert "Doe" not in str(study) and "PID42" not in str(study)
