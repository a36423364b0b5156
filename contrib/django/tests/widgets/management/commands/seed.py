"""Users, widgets and the old API keys the test starts from; prints the users' pks as JSON."""

import json

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from users.models import APIKey
from widgets.models import Widget


class Command(BaseCommand):
    def handle(self, *args, **options):
        User = get_user_model()
        alice = User.objects.create_user("alice", password="unused-in-tests")
        admin = User.objects.create_user("admin", password="unused-in-tests", is_staff=True)
        carol = User.objects.create_user("carol", password="unused-in-tests", is_active=False)
        for owner, name in [(alice, "alice-1"), (alice, "alice-2"), (admin, "admin-1")]:
            Widget.objects.create(owner=owner, name=name)
        for name, key, user in [
            ("alice laptop", "sk_live_alice_0123456789abcdef", alice),
            ("admin console", "sk_live_admin_0123456789abcdef", admin),
            ("carol old", "sk_live_carol_0123456789abcdef", carol),
            ("shared bot", "sk_live_bot_0123456789abcdef", None),
        ]:
            APIKey.objects.create(name=name, key=key, user=user)
        self.stdout.write(json.dumps({u.username: u.pk for u in (alice, admin, carol)}))
