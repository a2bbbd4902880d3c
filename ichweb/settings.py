"""Django settings, all read from the environment (see README "Settings").

ICH_ENV=development (default) gives safe local defaults; ICH_ENV=production
requires a real secret key and host names and turns on every HTTPS protection.
A bad value stops start-up with a message naming the variable.
"""

import getpass
import ipaddress
import os
import re
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from ichweb.env import env_bool, env_choice, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("ICH_VAR_DIR", str(BASE_DIR / "var")))

ICH_ENV = env_choice("ICH_ENV", "development", ("development", "production"))
PRODUCTION = ICH_ENV == "production"
DEBUG = env_bool("ICH_DEBUG", default=False)
if PRODUCTION and DEBUG:
    raise ImproperlyConfigured("ICH_DEBUG must not be on when ICH_ENV=production.")

_DEV_SECRET_KEY = "development-only-insecure-key-never-use-in-production-ich-triage-0123456789"  # noqa: S105 - refused in production
if PRODUCTION:
    SECRET_KEY = env_str("ICH_SECRET_KEY")
    if len(SECRET_KEY) < 50 or SECRET_KEY == _DEV_SECRET_KEY:
        raise ImproperlyConfigured("ICH_SECRET_KEY must be a unique random string of 50+ chars.")
    ALLOWED_HOSTS = env_list("ICH_ALLOWED_HOSTS", [])
    if not ALLOWED_HOSTS:
        raise ImproperlyConfigured("ICH_ALLOWED_HOSTS is required when ICH_ENV=production.")
else:
    SECRET_KEY = env_str("ICH_SECRET_KEY", _DEV_SECRET_KEY)
    ALLOWED_HOSTS = env_list("ICH_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("ICH_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "axes",
    "worklist",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",
    "worklist.middleware.AuditDeniedMiddleware",
]

ROOT_URLCONF = "ichweb.urls"
ASGI_APPLICATION = "ichweb.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict:
    """DATABASE_URL when set, else the private cluster that `make run` starts under var/pg."""
    url = env_str("DATABASE_URL", "-")
    if url != "-":
        try:
            return dict(dj_database_url.parse(url, conn_max_age=60, conn_health_checks=True))
        except ValueError as error:
            raise ImproperlyConfigured(
                f"DATABASE_URL is not a valid database URL: {error}"
            ) from None
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": env_str("ICH_DB_NAME", "ichweb"),
        "USER": getpass.getuser(),
        "HOST": str(VAR_DIR / "pg" / "run"),
        "PORT": str(env_int("ICH_PG_PORT", 5432, minimum=1, maximum=65535)),
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
    }


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str(
    "REDIS_URL", f"redis://127.0.0.1:{env_int('ICH_REDIS_PORT', 6390, minimum=1, maximum=65535)}/0"
)
if not REDIS_URL.startswith(("redis://", "rediss://")):
    raise ImproperlyConfigured("REDIS_URL must start with redis:// or rediss://.")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # A consumer waits for messages with BZPOPMIN for 5 s at a time; redis-py 8 also
            # times socket reads out at 5 s by default, which killed every WebSocket left idle
            # for 5 s. The read timeout must outlast the blocking pop.
            "hosts": [{"address": REDIS_URL, "socket_timeout": 15}],
            "prefix": env_str("ICH_CHANNEL_PREFIX", "ich"),
        },
    }
}

CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Authentication: Axes throttles login attempts; sessions end after an idle timeout.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("ICH_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = env_int("ICH_LOGIN_COOLOFF_MINUTES", 15, minimum=1) / 60  # hours
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False

SESSION_IDLE_TIMEOUT_MINUTES = env_int("ICH_SESSION_IDLE_TIMEOUT_MINUTES", 15, minimum=1)
SESSION_COOKIE_AGE = SESSION_IDLE_TIMEOUT_MINUTES * 60
SESSION_SAVE_EVERY_REQUEST = True  # every request pushes the expiry: an idle timeout
SESSION_EXPIRE_AT_BROWSER_CLOSE = True
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": 12},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# HTTPS protections: always on in production, opt-in for a local TLS proxy.
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
if PRODUCTION:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("ICH_SECURE_SSL_REDIRECT", default=True)
    SECURE_HSTS_SECONDS = env_int("ICH_HSTS_SECONDS", 31536000, minimum=3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    if env_bool("ICH_BEHIND_TLS_PROXY", default=False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["worklist.roles.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["worklist.roles.DenyAll"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 100,
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "worklist.api.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "ICH triage API",
    "DESCRIPTION": (
        "Computer-aided triage (CADt) of intracranial haemorrhage on head CT. "
        "Triage support, not diagnosis: a clinician always reads the full images."
    ),
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "StudyStatusEnum": "worklist.models.StudyStatus",
        "AIResultStatusEnum": "worklist.models.AIResultStatus",
    },
}

LANGUAGE_CODE = "en-gb"
TIME_ZONE = env_str("ICH_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
MEDIA_ROOT = Path(env_str("ICH_MEDIA_ROOT", str(VAR_DIR / "media")))

# Priority and scoring (used by the worklist; see DESIGN.md "Priority").
ICH_MAX_WAIT_MINUTES = env_int("ICH_MAX_WAIT_MINUTES", 30, minimum=1)
ICH_STUDY_QUIET_SECONDS = env_int("ICH_STUDY_QUIET_SECONDS", 5, minimum=0, maximum=3600)
ICH_SCORING_STUCK_MINUTES = env_int("ICH_SCORING_STUCK_MINUTES", 15, minimum=12)


def _trusted_proxies() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in env_list("ICH_TRUSTED_PROXIES", []):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ImproperlyConfigured(
                f"ICH_TRUSTED_PROXIES: {item!r} is not an IP address or network."
            ) from None
    return tuple(networks)


# Proxies whose X-Forwarded-For is believed: the audit log then records the client the proxy
# saw, not the proxy (the right-most address that is not itself a trusted proxy).
ICH_TRUSTED_PROXIES = _trusted_proxies()
ICH_MODEL_PATH = os.environ.get("ICH_MODEL_PATH") or None  # None: the shipped model
if ICH_MODEL_PATH and not Path(ICH_MODEL_PATH).is_file():
    raise ImproperlyConfigured(f"ICH_MODEL_PATH={ICH_MODEL_PATH!r} is not a file.")
# Each worker process loads the model as it starts (and /healthz reports whether it could).
ICH_PRELOAD_MODEL = env_bool("ICH_PRELOAD_MODEL", True)
CELERY_TASK_ROUTES = {"worklist.tasks.score_study": {"queue": "gpu"}}
# With acks_late, a task whose worker died (SIGKILL, OOM, power loss) stays unacknowledged in
# Redis until the visibility timeout passes, then goes back to its queue. Kombu's default is an
# hour; 5 minutes is longer than any normal scoring run or countdown here (a task still running
# past it may be handed to a second worker too: harmless, scoring is idempotent, only wasted).
# Unacknowledged messages are looked at every 10 s (kombu's default scan is every 100 s).
ICH_BROKER_VISIBILITY_TIMEOUT_SECONDS = env_int(
    "ICH_BROKER_VISIBILITY_TIMEOUT_SECONDS", 300, minimum=10, maximum=86400
)
if ICH_BROKER_VISIBILITY_TIMEOUT_SECONDS <= ICH_STUDY_QUIET_SECONDS:
    raise ImproperlyConfigured(
        "ICH_BROKER_VISIBILITY_TIMEOUT_SECONDS must be longer than ICH_STUDY_QUIET_SECONDS "
        "(a completeness check waits that long unacknowledged)."
    )
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": ICH_BROKER_VISIBILITY_TIMEOUT_SECONDS,
    "unacked_restore_interval": 10,
    "unacked_restore_throttle": 1,
}
CELERY_BEAT_SCHEDULE = {
    "sweep-stuck-studies": {"task": "worklist.tasks.sweep_stuck_studies", "schedule": 60.0},
}

# Ways in (worklist/ingest.py): the DICOM receiver (`manage.py dicom_receiver`), STOW-RS, uploads.
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # printable ASCII except backslash


def _ae_title(name: str, value: str) -> str:
    if not _AE_TITLE.fullmatch(value) or not value.strip():
        raise ImproperlyConfigured(
            f"{name}={value!r} is not a DICOM AE title (1-16 printable ASCII, no backslash)."
        )
    return value.strip()


def _bind_host(name: str, value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", value):
            return value
        raise ImproperlyConfigured(f"{name}={value!r} is not an IP address or host name.") from None


ICH_DICOM_AE_TITLE = _ae_title("ICH_DICOM_AE_TITLE", env_str("ICH_DICOM_AE_TITLE", "ICHTRIAGE"))
ICH_DICOM_HOST = _bind_host("ICH_DICOM_HOST", env_str("ICH_DICOM_HOST", "127.0.0.1"))
ICH_DICOM_PORT = env_int("ICH_DICOM_PORT", 11112, minimum=1, maximum=65535)
# Associations open at once (pynetdicom's default, 10, let ten idle sockets lock every
# scanner out), and how long a connection may wait before it asks for an association.
ICH_DICOM_MAX_ASSOCIATIONS = env_int("ICH_DICOM_MAX_ASSOCIATIONS", 64, minimum=1, maximum=1000)
ICH_DICOM_ASSOCIATION_TIMEOUT_SECONDS = env_int(
    "ICH_DICOM_ASSOCIATION_TIMEOUT_SECONDS", 10, minimum=1, maximum=600
)
# Connections open at once from one address (a scanner sends on a few), and the largest
# instance received: a C-STORE growing past it is aborted as it arrives.
ICH_DICOM_MAX_ASSOCIATIONS_PER_ADDRESS = env_int(
    "ICH_DICOM_MAX_ASSOCIATIONS_PER_ADDRESS", 16, minimum=1, maximum=1000
)
ICH_DICOM_MAX_INSTANCE_MB = env_int("ICH_DICOM_MAX_INSTANCE_MB", 512, minimum=1)
ICH_DICOM_ALLOWED_AETS = [
    _ae_title("ICH_DICOM_ALLOWED_AETS", title) for title in env_list("ICH_DICOM_ALLOWED_AETS", [])
]
ICH_UPLOAD_MAX_MB = env_int("ICH_UPLOAD_MAX_MB", 2048, minimum=1)
# A browser upload of one series' files in one request; bigger sets go as a .zip.
DATA_UPLOAD_MAX_NUMBER_FILES = 2000


def _destination(name: str) -> tuple[str, str, int] | None:
    """AE@host:port of the PACS that receives results, or None."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    match = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d{1,5})", raw)
    if not match or not 0 < int(match.group(3)) < 65536:
        raise ImproperlyConfigured(f"{name}={raw!r} must look like AE_TITLE@host:port.")
    return _ae_title(name, match.group(1)), match.group(2), int(match.group(3))


ICH_RESULTS_DESTINATION = _destination("ICH_RESULTS_DESTINATION")

# Logs never carry PHI: the app logs ids, never names, patient ids or file contents.
# Library warnings reach the logs through logger py.warnings with their text withheld
# (ichweb.logfilters): they quote the values they warn about, a patient name among them. So do
# the DICOM libraries' own log records, and a logged exception keeps its type and traceback but
# not its message (ichweb.logfilters.WithholdPatientData, on the handler).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {
        "withhold_warning_text": {"()": "ichweb.logfilters.WithholdWarningText"},
        "withhold_patient_data": {"()": "ichweb.logfilters.WithholdPatientData"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["withhold_patient_data"],
        }
    },
    "loggers": {
        "py.warnings": {"filters": ["withhold_warning_text"]},
        # pynetdicom's and highdicom's INFO is a line per PDU or attribute copied (its text
        # withheld); what the receiver and the export do is logged by worklist
        "pynetdicom": {"level": "WARNING"},
        "highdicom": {"level": "WARNING"},
        # uvicorn gives its loggers a handler of their own, outside the filter; an exception
        # escaping the app would be logged with its message there (scripts/web.sh)
        "uvicorn": {"handlers": ["console"], "level": "WARNING", "propagate": False},
        "uvicorn.access": {"handlers": [], "propagate": False},
    },
    "root": {"handlers": ["console"], "level": env_str("ICH_LOG_LEVEL", "INFO")},
}
