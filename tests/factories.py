import factory
import numpy as np
from django.contrib.auth.models import Group, User
from django.utils import timezone
from factory.django import DjangoModelFactory

from worklist import scoring, services
from worklist.models import (
    AIResult,
    AIResultStatus,
    Finding,
    HaemorrhageClass,
    Instance,
    Series,
    Study,
)
from worklist.roles import ADMIN


class UserFactory(DjangoModelFactory):
    class Meta:
        model = User
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("correct-horse-battery-9")

    @factory.post_generation
    def role(self, create, role_name, **kwargs):  # type: ignore[no-untyped-def]
        if role_name:
            self.groups.add(Group.objects.get_or_create(name=role_name)[0])
            self.is_staff = role_name == ADMIN
            self.save()
            services.roles_sync()


class StudyFactory(DjangoModelFactory):
    class Meta:
        model = Study

    study_instance_uid = factory.Sequence(lambda n: f"1.2.826.0.1.3680043.10.1.{n}")
    accession_number = factory.Sequence(lambda n: f"ACC{n:06d}")
    patient_id = factory.Sequence(lambda n: f"PID{n:06d}")
    patient_name = "Doe^Jane"


class SeriesFactory(DjangoModelFactory):
    class Meta:
        model = Series

    study = factory.SubFactory(StudyFactory)
    series_instance_uid = factory.Sequence(lambda n: f"1.2.826.0.1.3680043.10.2.{n}")
    modality = "CT"


class InstanceFactory(DjangoModelFactory):
    class Meta:
        model = Instance

    series = factory.SubFactory(SeriesFactory)
    sop_instance_uid = factory.Sequence(lambda n: f"1.2.826.0.1.3680043.10.3.{n}")
    sop_class_uid = "1.2.840.10008.5.1.4.1.1.2"
    path = factory.Sequence(lambda n: f"studies/test/{n}.dcm")
    sha256 = "0" * 64
    size_bytes = 1024


class AIResultFactory(DjangoModelFactory):
    class Meta:
        model = AIResult

    study = factory.SubFactory(StudyFactory)
    status = AIResultStatus.SUCCEEDED
    model_name = "test-model"
    model_version = "0"
    finished_at = factory.LazyFunction(timezone.now)


class FindingFactory(DjangoModelFactory):
    class Meta:
        model = Finding

    result = factory.SubFactory(AIResultFactory)
    haemorrhage_class = "subdural"
    probability = 0.93
    flagged = True


def scoring_output(
    uids: list[str], *, flagged: bool = True, heatmap: np.ndarray | None = None
) -> scoring.ScoringOutput:
    """What the model would return for these slices: "any" and "subdural" flagged (or nothing),
    with ``heatmap`` (N, H, W) uint8 for the flagged classes (a flat 8 x 8 map by default)."""
    classes = HaemorrhageClass.values
    flags = {c: flagged and c in ("any", "subdural") for c in classes}
    maps = heatmap if heatmap is not None else np.full((len(uids), 8, 8), 200, np.uint8)
    return scoring.ScoringOutput(
        model_name="test-model",
        model_version="1",
        probabilities={c: 0.8 if flags[c] else 0.1 for c in classes},
        thresholds={c: 0.5 for c in classes},
        flags=flags,
        slice_probabilities=[[0.5] * 6 for _ in uids],
        key_slices={c: 0 for c in classes},
        sop_instance_uids=uids,
        heatmaps={c: maps for c in classes if flags[c]},
    )
