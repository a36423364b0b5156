"""contrib/django's own tests, with Django's test client (tests/django.rs runs them, and the
same app behind the real gateway)."""

import hashlib
import hmac
import time

from django.contrib.auth import get_user_model
from django.core import checks
from django.core.cache import cache
from django.test import AsyncClient, TestCase, override_settings

from keygate_django import conf
from keygate_django.identity import KeygateClient
from keygate_django.signature import (
    SignatureError,
    parse_secrets,
    sign,
    signed_text,
    verify,
)
from widgets.models import Widget

SECRET = "test-secret-0123456789abcdef0123456789"
OTHER = "other-secret-0123456789abcdef012345678"


def signed_headers(
    path,
    *,
    key_id="key_abc",
    key_name="frontend",
    owner=None,
    method="GET",
    query="",
    request_id="req-1",
    secrets=(SECRET,),
    at=None,
):
    """The headers keygate would add to a request for `path` (decoded) and `query`."""
    t = int(time.time()) if at is None else at
    if not key_id:
        key_name = ""  # no key (a public path): no identity at all
    text = signed_text(
        timestamp=t,
        method=method,
        request_id=request_id.encode(),
        key_id=key_id.encode(),
        key_name=key_name.encode(),
        owner=(owner or "").encode(),
        query=query.encode(),
        path=path.encode(),
    )
    v1 = ",".join(f"v1={sign(s.encode(), text)}" for s in secrets)
    headers = {"X-Keygate-Signature": f"t={t},{v1}", "X-Request-Id": request_id}
    if key_id:
        headers |= {"X-Api-Key-Id": key_id, "X-Api-Key-Name": key_name}
    if owner is not None:
        headers["X-Api-Key-Owner"] = owner
    return headers


class SignatureTests(TestCase):
    def test_the_text_and_vector_keygate_signs(self):
        # The same vector as src/identity.rs's signs_the_documented_text.
        text = signed_text(
            timestamp=1700000000,
            method="post",
            request_id=b"req-1",
            key_id=b"key_abc",
            key_name=b"frontend",
            owner=b"42",
            query=b"a=1&b=%20x",
            path=b"/api/v1/video/process/",
        )
        self.assertEqual(
            text,
            b"keygate-identity-v1\n1700000000\nPOST\nreq-1\nkey_abc\nfrontend\n42\n"
            b"a=1&b=%20x\n/api/v1/video/process/",
        )
        self.assertEqual(
            sign(b"0123456789abcdef0123456789abcdef", text),
            "0e279a9041408f3976030a187fea4a50ca67ffba8aac760eb57c80c53014c818",
        )
        want = hmac.new(b"0123456789abcdef0123456789abcdef", text, hashlib.sha256).hexdigest()
        self.assertEqual(sign(b"0123456789abcdef0123456789abcdef", text), want)

    def fields(self, **changes):
        f = dict(
            method="GET",
            request_id=b"r",
            key_id=b"key_a",
            key_name=b"n",
            owner=b"",
            query=b"",
            path=b"/x",
        )
        f.update(changes)
        return f

    def test_verify_accepts_either_secret_and_refuses_the_rest(self):
        now = 1_700_000_000
        text = signed_text(timestamp=now, **self.fields())
        header = f"t={now},v1={sign(SECRET.encode(), text)},v1={sign(OTHER.encode(), text)}"
        for secrets in ([SECRET.encode()], [OTHER.encode()], [b"x" * 32, OTHER.encode()]):
            verify(header, secrets, now=now + 299, max_age=300, **self.fields())
        bad = [
            (dict(), [b"y" * 32], now),  # another secret
            (dict(), [SECRET.encode()], now + 301),  # expired
            (dict(), [SECRET.encode()], now - 301),  # from the future
            (dict(path=b"/y"), [SECRET.encode()], now),
            (dict(query=b"a=1"), [SECRET.encode()], now),
            (dict(owner=b"1"), [SECRET.encode()], now),
            (dict(key_id=b"key_b"), [SECRET.encode()], now),
            (dict(method="POST"), [SECRET.encode()], now),
            (dict(request_id=b"s"), [SECRET.encode()], now),
        ]
        for changes, secrets, at in bad:
            with self.subTest(changes=changes, at=at), self.assertRaises(SignatureError):
                verify(header, secrets, now=at, max_age=300, **self.fields(**changes))
        for header in [None, "", "t=1", "v1=" + "0" * 64, "t=x,v1=" + "0" * 64, "t=1,v1=zz", "junk"]:
            with self.subTest(header=header), self.assertRaises(SignatureError):
                verify(header, [SECRET.encode()], now=1, max_age=300, **self.fields())

    def test_secrets_are_read_as_keygate_reads_them(self):
        self.assertEqual(len(parse_secrets(f"{SECRET}\n{OTHER}\n")), 2)
        self.assertEqual(len(parse_secrets(f" {SECRET} , {OTHER} ")), 2)
        self.assertEqual(len(parse_secrets([SECRET])), 1)
        for bad in ["", "short", f"{SECRET},{OTHER},{SECRET}"]:
            with self.subTest(bad=bad), self.assertRaises(ValueError) as e:
                parse_secrets(bad)
            self.assertNotIn(SECRET, str(e.exception))


class BehindKeygateTests(TestCase):
    """The middleware and the DRF class on this project's views."""

    @classmethod
    def setUpTestData(cls):
        User = get_user_model()
        cls.alice = User.objects.create_user("alice")
        cls.admin = User.objects.create_user("admin", is_staff=True)
        cls.carol = User.objects.create_user("carol", is_active=False)
        Widget.objects.create(owner=cls.alice, name="a1")
        Widget.objects.create(owner=cls.admin, name="b1")

    def setUp(self):
        cache.clear()

    def get(self, path, query="", **kw):
        headers = signed_headers(path, query=query, **kw)
        url = path + (f"?{query}" if query else "")
        return self.client.get(url, headers=headers)

    def test_an_owner_is_the_user_it_names(self):
        r = self.get("/api/whoami/", owner=str(self.alice.pk))
        self.assertEqual(r.status_code, 200, r.content)
        body = r.json()
        self.assertEqual((body["pk"], body["username"], body["is_user"]), (str(self.alice.pk), "alice", True))
        self.assertEqual((body["key_id"], body["owner"], body["signed"]), ("key_abc", str(self.alice.pk), True))
        r = self.get("/api/widgets/", owner=str(self.alice.pk), request_id="r2")
        self.assertEqual([w["name"] for w in r.json()], ["a1"])
        r = self.get("/plain/", owner=str(self.alice.pk), request_id="r3")
        self.assertEqual(r.json(), {"authenticated": True, "username": "alice"})

    def test_a_key_without_a_user_is_a_keygate_client(self):
        for owner in [None, "999999", "not-a-pk"]:
            with self.subTest(owner=owner):
                cache.clear()
                r = self.get("/api/whoami/", owner=owner, request_id=f"w-{owner}")
                self.assertEqual(r.status_code, 200, r.content)
                self.assertEqual(r.json()["pk"], "key_abc")
                self.assertFalse(r.json()["is_user"])
                self.assertFalse(r.json()["is_staff"])
                # A per-user view refuses it rather than failing on the queryset.
                r = self.get("/api/widgets/", owner=owner, request_id=f"x-{owner}")
                self.assertEqual(r.status_code, 403)
                self.assertEqual(self.get("/api/admin-only/", owner=owner, request_id=f"y-{owner}").status_code, 403)

    def test_is_admin_user_and_inactive_owners(self):
        self.assertEqual(self.get("/api/admin-only/", owner=str(self.alice.pk)).status_code, 403)
        r = self.get("/api/admin-only/", owner=str(self.admin.pk), request_id="r2")
        self.assertEqual(r.json(), {"admin": "admin"})
        r = self.get("/api/whoami/", owner=str(self.carol.pk), request_id="r3")
        self.assertEqual(r.status_code, 401)
        self.assertEqual(r.json()["detail"], "User inactive or deleted.")

    @override_settings(KEYGATE={"IDENTITY_SECRETS": [SECRET], "OWNER_FIELD": "username"})
    def test_owner_field_username(self):
        r = self.get("/api/whoami/", owner="admin")
        self.assertEqual((r.json()["username"], r.json()["is_staff"]), ("admin", True))

    def test_user_rate_throttle_counts_per_user_and_per_key(self):
        statuses = [
            self.get("/api/throttled/", owner=str(self.alice.pk), request_id=f"t{i}").status_code
            for i in range(7)
        ]
        self.assertEqual(statuses, [200] * 5 + [429] * 2)
        statuses = [
            self.get("/api/throttled/", key_id="key_bot", request_id=f"b{i}").status_code
            for i in range(6)
        ]
        self.assertEqual(statuses, [200] * 5 + [429])

    def test_forged_identity_is_refused(self):
        good = signed_headers("/api/whoami/", owner=str(self.alice.pk))
        forged = [
            {k: v for k, v in good.items() if k != "X-Keygate-Signature"},
            good | {"X-Api-Key-Owner": str(self.admin.pk)},
            good | {"X-Api-Key-Id": "key_other"},
            good | {"X-Request-Id": "another"},
            signed_headers("/api/whoami/", owner="1", secrets=(OTHER,)),
            signed_headers("/api/whoami/", owner="1", at=int(time.time()) - 301),
            {"X-Keygate-Signature": "t=1,v1=" + "0" * 64},
        ]
        for headers in forged:
            with self.subTest(headers=headers):
                r = self.client.get("/api/whoami/", headers=headers)
                self.assertEqual(r.status_code, 401)
                self.assertEqual(r.json()["detail"], "Identity headers were not signed by keygate.")
                self.assertEqual(r["WWW-Authenticate"], 'Bearer realm="keygate"')
        # Signed for another path or query.
        r = self.client.get("/api/admin-only/", headers=signed_headers("/api/whoami/", owner=str(self.admin.pk)))
        self.assertEqual(r.status_code, 401)
        r = self.client.get("/api/whoami/?x=1", headers=signed_headers("/api/whoami/", request_id="q"))
        self.assertEqual(r.status_code, 401)
        # A plain Django view is protected by the middleware too.
        self.assertEqual(self.client.get("/plain/", headers=forged[1]).status_code, 401)

    def test_a_signature_is_accepted_once(self):
        headers = signed_headers("/api/whoami/", owner=str(self.alice.pk), request_id="once")
        self.assertEqual(self.client.get("/api/whoami/", headers=headers).status_code, 200)
        self.assertEqual(self.client.get("/api/whoami/", headers=headers).status_code, 401)

    def test_paths_and_queries_are_checked_as_received(self):
        # The client percent-encodes; the server hands the app the decoded path.
        headers = signed_headers("/api/public/ x", query="a=%20b&c=d", key_id="")
        r = self.client.get("/api/public/%20x?a=%20b&c=d", headers=headers)
        self.assertEqual(r.status_code, 404)  # no such view, but the signature was good
        headers = signed_headers("/api/public/", query="a=%20b", key_id="", request_id="p2")
        r = self.client.get("/api/public/?a=%20b", headers=headers)
        self.assertEqual(r.json(), {"authenticated": False})

    def test_no_identity_is_anonymous(self):
        self.assertEqual(self.client.get("/api/whoami/").status_code, 401)
        self.assertEqual(self.client.get("/api/public/").json(), {"authenticated": False})
        self.assertEqual(self.client.get("/plain/").json(), {"authenticated": False, "username": None})

    @override_settings(KEYGATE={"GATEWAY_ADDRESSES": ["127.0.0.1"]})
    def test_without_a_secret_only_gateway_addresses_are_believed(self):
        headers = {"X-Api-Key-Id": "key_a", "X-Api-Key-Name": "n", "X-Api-Key-Owner": str(self.alice.pk)}
        r = self.client.get("/api/whoami/", headers=headers)
        self.assertEqual((r.status_code, r.json()["signed"]), (200, False))
        r = self.client.get("/api/whoami/", headers=headers, REMOTE_ADDR="10.0.0.7")
        self.assertEqual(r.status_code, 401)
        self.assertEqual(r.json()["detail"], "Identity headers are accepted from the gateway only.")
        warnings = checks.run_checks(tags=[checks.Tags.security])
        self.assertIn("keygate_django.W001", [w.id for w in warnings])

    def test_bad_settings_are_named(self):
        for setting, needle in [
            ({"IDENTITY_SECRETS": ["short"]}, "fewer than 32"),
            ({"IDENTITY_SECRET_FILE": "/nonexistent/secret"}, "/nonexistent/secret"),
            ({"IDENTITY_SECRETS": [SECRET], "IDENTITY_SECRET_FILE": "/x"}, "not both"),
            ({"MAX_AGE": 0}, "MAX_AGE"),
            ({"SECRETS": [SECRET]}, "unknown keys"),
        ]:
            with self.subTest(setting=setting), override_settings(KEYGATE=setting):
                errors = checks.run_checks(tags=[checks.Tags.security])
                self.assertTrue(any(e.id == "keygate_django.E001" and needle in e.msg for e in errors), errors)
        conf.get.cache_clear()


class AsgiTests(TestCase):
    """The same checks over ASGI (the async middleware and the ASGI request's path)."""

    @classmethod
    def setUpTestData(cls):
        cls.alice = get_user_model().objects.create_user("alice")

    async def test_signed_and_forged_over_asgi(self):
        client = AsyncClient()
        headers = signed_headers("/api/whoami/", owner=str(self.alice.pk), query="x=%41", request_id="a1")
        r = await client.get("/api/whoami/?x=%41", headers=headers)
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual(r.json()["username"], "alice")
        forged = headers | {"X-Api-Key-Owner": "2", "X-Request-Id": "a2"}
        r = await client.get("/api/whoami/?x=%41", headers=forged)
        self.assertEqual(r.status_code, 401)


class KeygateClientTests(TestCase):
    def test_attributes_drf_reads(self):
        from keygate_django.identity import Identity

        client = KeygateClient(Identity("key_x", "bot", None, True))
        self.assertEqual((client.pk, client.id, str(client)), ("key_x", "key_x", "bot"))
        self.assertTrue(client.is_authenticated and client.is_active)
        self.assertFalse(client.is_anonymous or client.is_staff or client.is_superuser)
        self.assertFalse(client.has_perm("widgets.view_widget"))
        self.assertEqual((client.groups.count(), client.user_permissions.count()), (0, 0))
        self.assertEqual(client, KeygateClient(Identity("key_x", "other", "1", True)))
