"""Scores again the studies whose scoring failed ("AI unavailable"), once what failed them is
mended: a model file replaced, a disk freed. Studies that failed on their own files fail again.

    python manage.py rescore --failed        every study marked "AI unavailable"
    python manage.py rescore 12 15           these studies (each must be marked so)
"""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from worklist import scoring
from worklist.models import Study, StudyStatus


class Command(BaseCommand):
    help = __doc__.split("\n\n")[0].replace("\n", " ")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("study_ids", nargs="*", type=int, help="study ids (the API's)")
        parser.add_argument("--failed", action="store_true", help="every failed study")

    def handle(self, *args: Any, study_ids: list[int], failed: bool, **options: Any) -> None:
        if failed == bool(study_ids):
            raise CommandError("name study ids or --failed (not both)")
        if failed:
            study_ids = list(
                Study.objects.filter(status=StudyStatus.FAILED)
                .order_by("received_at")
                .values_list("pk", flat=True)
            )
        missing = sorted(
            set(study_ids)
            - set(Study.objects.filter(pk__in=study_ids).values_list("pk", flat=True))
        )
        if missing:
            raise CommandError(f"no study with id {', '.join(map(str, missing))}")
        queued = [pk for pk in study_ids if scoring.study_rescore(study_id=pk)]
        left = [pk for pk in study_ids if pk not in queued]
        self.stdout.write(f"queued {len(queued)} of {len(study_ids)} studies for scoring again")
        if left:
            self.stdout.write(
                f"not marked AI unavailable, left as they are: {', '.join(map(str, left))}"
            )
