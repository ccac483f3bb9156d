"""Django settings for orchestrator-ws; every deployment knob comes from the environment."""

from __future__ import annotations

import dj_database_url

from orchestrator_ws.environment import load_environment

ENV = load_environment()

SECRET_KEY = ENV.DJANGO_SECRET_KEY or "django-insecure-development-only-key"
DEBUG = ENV.DJANGO_DEBUG
ALLOWED_HOSTS = ENV.DJANGO_ALLOWED_HOSTS

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "orchestrator_ws",
    "engine_status",
    "processes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves /static/ (the dashboard's CSS and JS, the admin's) from daphne itself.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "orchestrator_ws.urls"
ASGI_APPLICATION = "orchestrator_ws.asgi.application"

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


def _database(url: str) -> dict:
    """Parse DATABASE_URL; SQLite gets WAL, a busy timeout and IMMEDIATE transactions,
    PostgreSQL a connection pool.

    WAL lets readers run while a worker thread commits a step; IMMEDIATE takes the write lock at
    BEGIN so two writers queue on the busy timeout instead of failing with "database is locked"
    when one of them tries to upgrade a read lock. This is what lets the worker pool and several
    daphne processes share one SQLite file.

    With PostgreSQL, a thread's connection goes back to the pool when Django closes it (at the
    end of a request, and a worker's before each step's function runs), so a server process
    needs at most DATABASE_POOL_SIZE connections however many processes its workers run:
    without it, a hundred running processes took PostgreSQL's default max_connections.
    """
    database = dj_database_url.parse(url, conn_max_age=0)
    if database["ENGINE"] == "django.db.backends.postgresql":
        pool = {"min_size": 1, "max_size": ENV.DATABASE_POOL_SIZE, "timeout": 30}
        database.setdefault("OPTIONS", {})["pool"] = pool
    if database["ENGINE"] == "django.db.backends.sqlite3":
        # Django's backend with a fairer wait for the write lock (orchestrator_ws/sqlite).
        database["ENGINE"] = "orchestrator_ws.sqlite"
        # A file, not Django's default in-memory test database: worker threads and the daphne
        # processes of end-to-end tests must all see the same data.
        name = str(database["NAME"])
        if name != ":memory:":
            database["TEST"] = {"NAME": name.removesuffix(".sqlite3") + "-test.sqlite3"}
        database["OPTIONS"] = {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    return database


DATABASES = {"default": _database(ENV.DATABASE_URL)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def _channel_layer() -> dict:
    """The layer the websocket consumers and the broadcast thread share."""
    history = {"history_size": ENV.WS_HISTORY_SIZE, "history_ttl": ENV.WS_HISTORY_SECONDS}
    # redis-py 8 caps a pool at 100 connections, which the stock layers exceed (and fail
    # handshakes with "Too many connections") once hundreds of clients connect at once.
    stock_hosts = [{"address": ENV.REDIS_URL, "max_connections": 2000}]
    if ENV.CHANNEL_LAYER == "redis":
        return {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": stock_hosts}}
    if ENV.CHANNEL_LAYER == "redis-pubsub":
        return {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer", "CONFIG": {"hosts": stock_hosts}}
    if ENV.REDIS_URL:
        return {
            "BACKEND": "orchestrator_ws.realtime.redis_layer.RedisFanoutLayer",
            "CONFIG": {"url": ENV.REDIS_URL, **history},
        }
    return {"BACKEND": "orchestrator_ws.realtime.layers.InMemoryFanoutLayer", "CONFIG": history}


CHANNEL_LAYERS = {"default": _channel_layer()}

# Websockets: authentication (off by default in development) and per-connection bounds.
WS_AUTH_REQUIRED = ENV.WS_AUTH_REQUIRED
WS_AUTH_TOKENS = ENV.WS_AUTH_TOKENS
# Origins allowed to open a websocket; a wildcard outside DEBUG fails a system check at start.
WS_ALLOWED_ORIGINS = ENV.WS_ALLOWED_ORIGINS if ENV.WS_ALLOWED_ORIGINS is not None else ALLOWED_HOSTS
# What a client may send (heartbeats only): bigger -> 1009, more often -> 1008, binary -> 1003.
WS_MAX_CLIENT_MESSAGE_BYTES = ENV.WS_MAX_CLIENT_MESSAGE_BYTES
WS_MAX_CLIENT_MESSAGES_PER_SECOND = ENV.WS_MAX_CLIENT_MESSAGES_PER_SECOND
# Open connections per client IP and per token, per server process; beyond, the handshake fails.
WS_MAX_CONNECTIONS_PER_IP = ENV.WS_MAX_CONNECTIONS_PER_IP
WS_MAX_CONNECTIONS_PER_TOKEN = ENV.WS_MAX_CONNECTIONS_PER_TOKEN
# Output a client may leave unread before it is closed with 1013.
WS_MAX_BUFFER_BYTES = ENV.WS_MAX_BUFFER_BYTES
WS_SOCKET_SEND_BUFFER_BYTES = ENV.WS_SOCKET_SEND_BUFFER_BYTES
WS_MAX_QUEUED_MESSAGES = 1000
# Live messages held for a client while it catches up; beyond, it is resynced.
WS_SYNC_BUFFER_MESSAGES = 1000

# The broadcast thread: queue bound, and the process-list coalescing window.
BROADCAST_QUEUE_SIZE = ENV.BROADCAST_QUEUE_SIZE
PROCESS_LIST_COALESCE_SECONDS = ENV.PROCESS_LIST_COALESCE_MS / 1000

# Worker threads that execute processes inside each server process.
MAX_WORKERS = ENV.MAX_WORKERS
# Python modules whose import registers workflows (see processes.workflow.register).
WORKFLOW_MODULES = ENV.WORKFLOW_MODULES

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# WhiteNoise finds the files in the apps' static/ directories, as runserver would: there is no
# collectstatic step, hence no STATIC_ROOT (WhiteNoise would warn at every start about an empty one).
WHITENOISE_USE_FINDERS = True

# The dashboard asks for a login only when websockets need one (WS_AUTH_REQUIRED, see pages.py).
LOGIN_REDIRECT_URL = "process-list"
LOGOUT_REDIRECT_URL = "login"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": ENV.LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
