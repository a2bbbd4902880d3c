"""Creates one demo user per role; prints each new password once (they are stored hashed)."""

import secrets
from typing import Any

from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand
from django.db import transaction

from worklist import services
from worklist.roles import ADMIN, ED_PHYSICIAN, RADIOLOGIST

DEMO_USERS = (("demo_ed", ED_PHYSICIAN), ("demo_radiologist", RADIOLOGIST), ("demo_admin", ADMIN))


class Command(BaseCommand):
    help = "Create the role groups and one demo user per role (passwords printed once)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--reset-passwords", action="store_true", help="Give existing demo users new passwords."
        )

    @transaction.atomic
    def handle(self, *args: Any, reset_passwords: bool = False, **options: Any) -> None:
        services.roles_sync()
        created = []
        for username, role in DEMO_USERS:
            user, is_new = User.objects.get_or_create(username=username)
            if is_new or reset_passwords:
                password = secrets.token_urlsafe(12)
                user.set_password(password)
                user.is_staff = role == ADMIN
                user.save()
                user.groups.set([Group.objects.get(name=role)])
                created.append((username, role, password))
        if not created:
            self.stdout.write(
                "Demo users exist (passwords were shown when they were created; "
                "`make demo-passwords` sets new ones)."
            )
            return
        self.stdout.write(self.style.WARNING("Demo users — these passwords are shown only once:"))
        for username, role, password in created:
            self.stdout.write(f"  {role:<14} {username:<18} {password}")
