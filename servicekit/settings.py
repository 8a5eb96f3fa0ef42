"""Settings shared by every service, read from the environment and validated at start-up."""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

READONLY_ROLE_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ENCODE_HINT = ("percent-encode special characters in the user name and password "
                "('%' as %25, '@' as %40, '/' as %2F, '#' as %23, '?' as %3F, ':' as %3A)")


class SettingsError(SystemExit):
    """A setting is missing or wrong; the message names the variable and the fix."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DatabaseSettings(BaseSettings):
    """Where the database is and how the schema is set up.

    `DATABASE_URL` wins; otherwise the URL is assembled from the `POSTGRES_*` variables
    (the names the official PostgreSQL and TimescaleDB images use).
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, env_ignore_empty=True)

    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    postgres_host: str = Field(default="localhost", validation_alias="POSTGRES_HOST")
    postgres_port: int = Field(default=5432, ge=1, le=65535, validation_alias="POSTGRES_PORT")
    postgres_user: str = Field(default="ecoflow", validation_alias="POSTGRES_USER")
    postgres_password: str = Field(default="", validation_alias="POSTGRES_PASSWORD")
    postgres_db: str = Field(default="ecoflow", validation_alias="POSTGRES_DB")

    readonly_user: str = Field(
        default="ecoflow_reader",
        pattern=READONLY_ROLE_PATTERN,
        validation_alias=AliasChoices("POSTGRES_READONLY_USER", "GRAFANA_DB_USER"),
    )
    readonly_password: str = Field(
        default="",
        validation_alias=AliasChoices("POSTGRES_READONLY_PASSWORD", "GRAFANA_DB_PASSWORD"),
    )
    retention_days: int = Field(default=365, ge=0, le=36500, validation_alias="RETENTION_DAYS")

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        try:
            parts = urlsplit(value)
        except ValueError:
            raise ValueError("is not a URL: use postgresql://user:password@host:5432/dbname; "
                             + _ENCODE_HINT) from None
        if parts.scheme not in ("postgres", "postgresql", "postgresql+psycopg"):
            raise ValueError(
                f"scheme {parts.scheme or '(none)'!r} is not PostgreSQL: "
                "use postgresql://user:password@host:5432/dbname"
            )
        _check_url_shape(value, parts)
        return value

    def libpq_url(self) -> str:
        """The URL for psycopg (postgresql://...)."""
        if self.database_url:
            parts = urlsplit(self.database_url)
            return urlunsplit(("postgresql",) + tuple(parts[1:]))
        auth = quote(self.postgres_user, safe="")
        if self.postgres_password:
            auth += ":" + quote(self.postgres_password, safe="")
        return (
            f"postgresql://{auth}@{self.postgres_host}:{self.postgres_port}/"
            f"{quote(self.postgres_db, safe='')}"
        )

    def sqlalchemy_url(self) -> str:
        """The URL for SQLAlchemy and Alembic (postgresql+psycopg://...)."""
        return "postgresql+psycopg" + self.libpq_url()[len("postgresql"):]


def _check_url_shape(url: str, parts) -> None:
    """Refuse what libpq would misread, mostly a password pasted in unencoded. The message
    says what is wrong and never repeats any part of the URL: the password may be in it."""
    if _BAD_ESCAPE.search(url):
        raise ValueError("has a '%' that is not followed by two hex digits: " + _ENCODE_HINT)
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    if "@" in userinfo:
        raise ValueError("has more than one '@' before the host: " + _ENCODE_HINT)
    if "#" in url:
        raise ValueError("has a '#' (PostgreSQL URLs have none): " + _ENCODE_HINT)
    # An '@' in the query is fine in a value (?user=me@corp), not in what a '?' cut off.
    if "@" in parts.path or (not at and "=" not in parts.query.partition("@")[0]
                             and "@" in parts.query):
        raise ValueError("has an '@' after the host: " + _ENCODE_HINT)
    for host in hostinfo.split(","):
        port = host.rpartition("]")[2] if host.startswith("[") else host
        _, colon, port = port.partition(":")
        if colon and not port.isdigit():
            raise ValueError("has a port that is not a number (a ':' in the host part): "
                             + _ENCODE_HINT)


ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "postgres_host": "POSTGRES_HOST",
    "postgres_port": "POSTGRES_PORT",
    "postgres_user": "POSTGRES_USER",
    "postgres_password": "POSTGRES_PASSWORD",
    "postgres_db": "POSTGRES_DB",
    "readonly_user": "POSTGRES_READONLY_USER",
    "readonly_password": "POSTGRES_READONLY_PASSWORD",
    "retention_days": "RETENTION_DAYS",
}


def load(settings_cls: type[BaseSettings], env_names: dict[str, str] | None = None, **kw):
    """Build a settings object, turning validation errors into one clear start-up error.

    The message names each variable (not the Python field) and never repeats a value, so a
    mistyped secret does not end up in a log.
    """
    names = dict(ENV_NAMES)
    names.update(env_names or {})
    try:
        return settings_cls(**kw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            variable = names.get(field, field.upper())
            # pydantic prefixes our validators' messages with "Value error, ": noise to a user.
            lines.append(f"{variable}: {err['msg'].removeprefix('Value error, ')}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def database_settings(**kw) -> DatabaseSettings:
    return load(DatabaseSettings, **kw)
