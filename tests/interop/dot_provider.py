"""django-oauth-toolkit (PyPI), configured strictly, for the interop tests (tests/test_interop.py).

Runs in its own virtual environment (tests/interop/.venv, from tests/interop/requirements.txt), as
`python dot_provider.py`, with PORT, DATA_DIR, CLIENT_ID, CLIENT_SECRET, REDIRECT_URIS (space-separated)
and ACCESS_TTL (seconds) in the environment. People sign in on Django's own login page (any username,
any password: a test backend creates them) and approve on the toolkit's consent page.
GET /_test/stats counts refresh requests by outcome, and /_test/refresh-token?token=... says whether a
refresh token is still live and what scope it carries (the toolkit introspects access tokens only).

Silent authorization (prompt=none, OpenID Connect Core §3.1.2.1) needs two things the toolkit leaves to
its deployer: a validator that implements validate_silent_login and validate_silent_authorization (the
toolkit's own raise NotImplementedError: a 500), and an authorization view that answers without its
consent page once they pass (SilentAuthorizationView). Here a person signed in at the toolkit (a Django
session) who approved this client before, for every scope asked now, is authorized silently; anyone else
gets login_required or consent_required.
"""

import contextvars
import json
import os
import sys
from collections import Counter
from pathlib import Path

import django
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.conf import settings

env = os.environ
DATA = Path(env["DATA_DIR"])
KEY_FILE = DATA / "oidc-key.pem"
if not KEY_FILE.exists():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    KEY_FILE.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    SECRET_KEY="interop-tests-only",
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=[
        "django.contrib.admin",
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "django.contrib.messages",
        "django.contrib.staticfiles",
        "oauth2_provider",
    ],
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
    ],
    TEMPLATES=[
        {
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "APP_DIRS": True,
            "OPTIONS": {
                "context_processors": [
                    "django.template.context_processors.request",
                    "django.contrib.auth.context_processors.auth",
                    "django.contrib.messages.context_processors.messages",
                ]
            },
        }
    ],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(DATA / "dot.sqlite3"), "OPTIONS": {"timeout": 20}}},
    AUTHENTICATION_BACKENDS=[f"{__name__}.AnyPassword"],
    LOGIN_URL="/accounts/login/",
    STATIC_URL="/static/",
    USE_TZ=True,
    # Server errors with their tracebacks into the log the tests keep.
    LOGGING={
        "version": 1,
        "handlers": {"console": {"class": "logging.StreamHandler"}},
        "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR"}},
    },
    OAUTH2_PROVIDER={
        "OIDC_ENABLED": True,
        "OIDC_RSA_PRIVATE_KEY": KEY_FILE.read_text(),
        "SCOPES": {"openid": "OpenID", "profile": "Profile", "email": "Email", "offline_access": "Offline", "viewables:read": "Viewer"},
        "DEFAULT_SCOPES": ["openid"],
        # Strict: PKCE, a new refresh token at every refresh, no grace for reuse, and a replayed one revokes the family.
        "PKCE_REQUIRED": True,
        "ROTATE_REFRESH_TOKEN": True,
        "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
        "REFRESH_TOKEN_REUSE_PROTECTION": True,
        "ACCESS_TOKEN_EXPIRE_SECONDS": int(env.get("ACCESS_TTL", "5")),
        "REFRESH_TOKEN_EXPIRE_SECONDS": 15 * 24 * 3600,
        "ALLOWED_REDIRECT_URI_SCHEMES": ["http", "https"],
        "OAUTH2_VALIDATOR_CLASS": f"{__name__}.Validator",
    },
)
django.setup()

from django.contrib import admin  # noqa: E402  (needs the settings above)
from django.contrib.auth import get_user_model  # noqa: E402
from django.contrib.auth.backends import ModelBackend  # noqa: E402
from django.contrib.auth.views import LoginView  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.http import JsonResponse  # noqa: E402
from django.urls import include, path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402
from oauth2_provider.exceptions import OAuthToolkitError  # noqa: E402
from oauth2_provider.models import RefreshToken, get_application_model  # noqa: E402
from oauth2_provider.oauth2_validators import OAuth2Validator  # noqa: E402
from oauth2_provider.views import AuthorizationView, TokenView  # noqa: E402

STATS = Counter()
# The person signed in at the toolkit, for the validator's silent checks: oauthlib's request does not carry Django's.
SIGNED_IN = contextvars.ContextVar("signed_in", default=None)


class AnyPassword(ModelBackend):
    """Let anyone in under any username and password, creating the account (tests only)."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if not username:
            return None
        user, _ = get_user_model().objects.get_or_create(username=username, defaults={"email": f"{username}@example.test"})
        return user


class Validator(OAuth2Validator):
    """Answer userinfo with the person's name and email."""

    oidc_claim_scope = None  # every claim for any token carrying openid

    def get_additional_claims(self, request):
        return {"name": request.user.username, "email": request.user.email}

    def validate_silent_login(self, request):
        """prompt=none: the person holds a session here."""
        user = SIGNED_IN.get()
        return user is not None and user.is_authenticated

    def validate_silent_authorization(self, request):
        """prompt=none: the person approved this client before for every scope asked now (one of their grants here, still live, covers them)."""
        live = RefreshToken.objects.filter(user=SIGNED_IN.get(), application__client_id=request.client_id, revoked__isnull=True)
        asked = set(request.scopes)
        return any(token.access_token is not None and asked <= set(token.access_token.scope.split()) for token in live.select_related("access_token"))


class SilentAuthorizationView(AuthorizationView):
    """The toolkit's authorization view, answering an OpenID prompt=none request without its consent page: the validator decides."""

    def get(self, request, *args, **kwargs):
        prompt, scopes = request.GET.get("prompt", "").split(), request.GET.get("scope", "").split()
        if "none" not in prompt or "openid" not in scopes:
            return super().get(request, *args, **kwargs)
        signed_in = SIGNED_IN.set(request.user)  # only a signed-in person gets here (LoginRequiredMixin): login_required otherwise
        try:
            scopes, credentials = self.validate_authorization_request(request)  # the validator's silent checks
            uri, _headers, _body, _status = self.create_authorization_response(request=request, scopes=" ".join(scopes), credentials=credentials, allow=True)
        except OAuthToolkitError as error:
            return self.error_response(error, application=None)  # consent_required, login_required: back to the client
        finally:
            SIGNED_IN.reset(signed_in)
        return self.redirect(uri, get_application_model().objects.get(client_id=credentials["client_id"]))


@csrf_exempt
def token(request):
    """The toolkit's token endpoint, counting refreshes by outcome."""
    reply = TokenView.as_view()(request)
    if request.POST.get("grant_type") == "refresh_token":
        narrowed = " narrowed" if request.POST.get("scope") else ""
        body = json.loads(reply.content or b"{}")
        STATS[f"refresh{narrowed} {reply.status_code} {body.get('error', 'ok')}"] += 1
    return reply


def stats(request):
    return JsonResponse(STATS)


def refresh_token(request):
    found = RefreshToken.objects.filter(token=request.GET["token"]).select_related("access_token").first()
    if found is None:
        return JsonResponse({"live": False, "found": False})
    scope = found.access_token.scope if found.access_token else None
    return JsonResponse({"live": found.revoked is None, "found": True, "scope": scope})


urlpatterns = [
    path("o/token/", token),
    path("o/authorize/", SilentAuthorizationView.as_view()),
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path("accounts/login/", LoginView.as_view(template_name="admin/login.html")),
    path("admin/", admin.site.urls),
    path("_test/stats", stats),
    path("_test/refresh-token", refresh_token),
]


def main() -> None:
    call_command("migrate", verbosity=0)
    get_application_model().objects.update_or_create(
        client_id=env["CLIENT_ID"],
        defaults={
            "name": "interop",
            "client_secret": env["CLIENT_SECRET"],
            "client_type": "confidential",
            "authorization_grant_type": "authorization-code",
            "redirect_uris": env["REDIRECT_URIS"],
            "algorithm": "RS256",
            "skip_authorization": False,
        },
    )
    call_command("runserver", f"127.0.0.1:{env['PORT']}", use_reloader=False, use_threading=True)


if __name__ == "__main__":
    sys.exit(main())
