"""The environment variables that configure orchestrator-ws, parsed and checked in one place.

Settings read these through :func:`load_environment`; every variable is documented in the README.
A bad or missing value stops the process with one line naming the variable, instead of a traceback
from somewhere deep in Django.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BASE_DIR = Path(__file__).resolve().parent.parent

CommaList = Annotated[list[str], NoDecode]


class Environment(BaseSettings):
    """Typed view of the process environment (names are the variable names, case-sensitive)."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore")

    DJANGO_SECRET_KEY: str = ""
    DJANGO_DEBUG: bool = False
    DJANGO_ALLOWED_HOSTS: CommaList = Field(default_factory=lambda: ["localhost", "127.0.0.1", "[::1]"])
    DATABASE_URL: str = f"sqlite:///{BASE_DIR / 'db.sqlite3'}"
    REDIS_URL: str = ""
    MAX_WORKERS: int = Field(default=5, ge=1, le=256)
    # PostgreSQL connections a server process keeps at most, whatever runs in its threads.
    DATABASE_POOL_SIZE: int = Field(default=20, ge=1, le=1000)
    # "fanout": the project's layer (Redis when REDIS_URL is set, in-memory otherwise);
    # "redis" / "redis-pubsub": channels_redis's stock layers, the benchmark's baselines.
    CHANNEL_LAYER: Literal["fanout", "redis", "redis-pubsub"] = "fanout"
    WS_AUTH_REQUIRED: bool = False
    WS_AUTH_TOKENS: CommaList = Field(default_factory=list)
    WS_HISTORY_SIZE: int = Field(default=1000, ge=1, le=1_000_000)
    WS_HISTORY_SECONDS: float = Field(default=600, gt=0)
    WS_MAX_BUFFER_BYTES: int = Field(default=1 << 20, ge=1024)
    # Kernel send buffer of each websocket (0: the OS default, which grows to megabytes).
    WS_SOCKET_SEND_BUFFER_BYTES: int = Field(default=64 * 1024, ge=0)
    # Origins allowed to open websockets (ALLOWED_HOSTS syntax); unset: DJANGO_ALLOWED_HOSTS.
    WS_ALLOWED_ORIGINS: CommaList | None = None
    WS_MAX_CLIENT_MESSAGE_BYTES: int = Field(default=4096, ge=16)
    WS_MAX_CLIENT_MESSAGES_PER_SECOND: int = Field(default=10, ge=1)
    # Open websockets per client IP / per token in one server process (0: no limit).
    WS_MAX_CONNECTIONS_PER_IP: int = Field(default=1000, ge=0)
    WS_MAX_CONNECTIONS_PER_TOKEN: int = Field(default=200, ge=0)
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Python modules whose import registers workflows.
    WORKFLOW_MODULES: CommaList = Field(default_factory=lambda: ["processes.demo_workflows"])
    PROCESS_LIST_COALESCE_MS: int = Field(default=100, ge=0, le=60_000)
    BROADCAST_QUEUE_SIZE: int = Field(default=10_000, ge=1)

    @field_validator(
        "DJANGO_ALLOWED_HOSTS", "WS_AUTH_TOKENS", "WS_ALLOWED_ORIGINS", "WORKFLOW_MODULES", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [host.strip() for host in value.split(",") if host.strip()]
        return value

    @model_validator(mode="after")
    def _secret_key_outside_debug(self) -> Environment:
        if not self.DJANGO_DEBUG and not self.DJANGO_SECRET_KEY:
            raise ValueError("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is off")
        if self.CHANNEL_LAYER != "fanout" and not self.REDIS_URL:
            raise ValueError(f"CHANNEL_LAYER={self.CHANNEL_LAYER} needs REDIS_URL")
        return self


def load_environment() -> Environment:
    """Parse the environment, or exit with a one-line message saying which variable to fix."""
    try:
        return Environment()
    except ValidationError as exc:
        error = exc.errors()[0]
        variable = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        where = f"{variable}: " if variable else ""
        raise SystemExit(f"orchestrator-ws: configuration error: {where}{message}") from None
