from datetime import timedelta

import pytest
from django.utils import timezone

from tests.factories import StudyFactory
from worklist import selectors
from worklist.models import ReviewState
from worklist.scoring import ScoringOutput, priority_of

CLASSES = ("any", "intraparenchymal", "intraventricular", "subdural", "epidural", "subarachnoid")


def _output(flags: dict[str, bool], probabilities: dict[str, float] | None = None) -> ScoringOutput:
    probabilities = {c: 0.1 for c in CLASSES} | (probabilities or {})
    return ScoringOutput(
        model_name="m",
        model_version="1",
        probabilities=probabilities,
        thresholds={c: 0.5 for c in CLASSES},
        flags={c: flags.get(c, False) for c in CLASSES},
        slice_probabilities=[],
        key_slices={c: 0 for c in CLASSES},
        sop_instance_uids=[],
    )


def test_a_flagged_study_outranks_any_unflagged_one() -> None:
    assert priority_of(_output({"any": True}, {"any": 0.51})) > priority_of(_output({}))


def test_an_epidural_bleed_outranks_a_subarachnoid_one_whatever_the_probabilities() -> None:
    epidural = _output({"any": True, "epidural": True}, {"epidural": 0.55})
    subarachnoid = _output({"any": True, "subarachnoid": True}, {"subarachnoid": 0.99})
    assert priority_of(epidural) > priority_of(subarachnoid)


def test_within_a_class_the_more_probable_bleed_comes_first() -> None:
    likely = _output({"subdural": True}, {"subdural": 0.9})
    possible = _output({"subdural": True}, {"subdural": 0.6})
    assert priority_of(likely) > priority_of(possible)


@pytest.mark.django_db
def test_the_worklist_orders_by_priority_then_waiting_time(settings) -> None:
    settings.ICH_MAX_WAIT_MINUTES = 30
    now = timezone.now()
    older = StudyFactory(received_at=now - timedelta(minutes=5), last_instance_at=now)
    newer = StudyFactory(received_at=now - timedelta(minutes=1), last_instance_at=now)
    flagged = StudyFactory(received_at=now, last_instance_at=now, priority=15.0)
    assert list(selectors.worklist_studies(now)) == [flagged, older, newer]


@pytest.mark.django_db
def test_a_study_waiting_past_the_maximum_is_lifted_above_flagged_ones(settings) -> None:
    settings.ICH_MAX_WAIT_MINUTES = 30
    now = timezone.now()
    flagged = StudyFactory(received_at=now, last_instance_at=now, priority=15.0)
    starving = StudyFactory(received_at=now - timedelta(minutes=31), last_instance_at=now)
    assert list(selectors.worklist_studies(now)) == [starving, flagged]


@pytest.mark.django_db
def test_a_reviewed_study_is_not_lifted(settings) -> None:
    settings.ICH_MAX_WAIT_MINUTES = 30
    now = timezone.now()
    flagged = StudyFactory(received_at=now, last_instance_at=now, priority=15.0)
    StudyFactory(
        received_at=now - timedelta(hours=2),
        last_instance_at=now,
        review_state=ReviewState.REVIEWED,
    )
    assert selectors.worklist_studies(now).first() == flagged
