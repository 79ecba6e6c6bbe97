"""Typed configuration, loaded once and injected (STYLE.md 9).

A TOML file (optional) and ``MSSANTE_<SECTION>__<KEY>`` environment
variables fill one :class:`Settings` value.  Every field has an embedded
default so the server starts with no file at all (the Quick start).
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "MSSANTE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SmtpSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the inbound SMTP listener binds to.")
    port: int = Field(2525, ge=0, le=65535, description="Inbound SMTP port (25 in production).")
    hostname: str = Field(
        "mx.patient.mssante.localhost",
        description="Name in the greeting and Received header; set so no DNS lookup happens.",
    )
    patient_domain: str = Field("patient.mssante.fr", description="The only domain accepted.")
    max_message_size: int = Field(
        25_000_000, gt=0, description="SIZE limit in octets (DOMAIN.md 3: 25 MB)."
    )
    max_header_size: int = Field(
        262_144, gt=1000, description="Largest header section in octets (552 5.3.4 beyond)."
    )
    timeout: float = Field(300.0, gt=0, description="Idle timeout of a session, in seconds.")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Gateway processes sharing the SMTP ports (SO_REUSEPORT, Linux); "
        "1 runs everything in one process.",
    )
    require_tls: bool = Field(
        True, description="Refuse MAIL before STARTTLS (530 5.7.0), as the trust space requires."
    )
    tls_cert: Path | None = Field(
        None, description="PEM server certificate chain; generated in the data dir if unset."
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    shutdown_grace: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, seconds sessions in progress may take to finish; new sessions"
        " get 421 4.3.2 meanwhile, and those still open at the deadline get it too.",
    )
    refusal: Literal["rcpt", "dsn"] = Field(
        "rcpt",
        description="How a patient recipient that cannot take the message (adresse invalide,"
        " patient non trouvé, messagerie fermée) is refused: 'rcpt' answers 550 to RCPT;"
        " 'dsn' accepts it and sends the sender a delivery status notification"
        " 'Message non distribué' (RFC 3464), as Mon espace santé does.",
    )

    @field_validator("patient_domain")
    @classmethod
    def _lower_domain(cls, value: str) -> str:
        return value.strip().lower().rstrip(".")


class SubmissionSettings(_Section):
    """Professional mail clients (RFC 6409), authenticated (accounts)."""

    enabled: bool = Field(True, description="Run the submission listener.")
    host: str = Field("127.0.0.1", description="Address the submission listeners bind to.")
    port: int = Field(2587, ge=0, le=65535, description="STARTTLS submission port (587).")
    implicit_tls_port: int | None = Field(
        None, ge=0, le=65535, description="Implicit TLS submission port (465), off if unset."
    )


class StoreSettings(_Section):
    data_dir: Path = Field(
        Path("mssante-data"), description="Database, blobs, spool, keys and dev certificates."
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy async URL; default SQLite in data_dir."
    )
    sqlite_synchronous: Literal["FULL", "EXTRA"] = Field(
        "FULL", description="SQLite synchronous pragma (durability)."
    )
    max_batch: int = Field(64, ge=1, description="Largest number of deliveries committed together.")
    keys_dir: Path | None = Field(
        None,
        description="Master key files (<id>.key, 'current'); default data_dir/keys."
        " MSSANTE_MASTER_KEY (base64) adds one and makes it current.",
    )
    create_master_key: bool = Field(
        True,
        description="Create a first master key when there is none (development);"
        " set false in production so a missing key stops the start.",
    )

    def keys_path(self) -> Path:
        return self.keys_dir or self.data_dir / "keys"

    def url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'mssante.db').resolve()}"


class TrustSettings(_Section):
    whitelist: Path | None = Field(
        None, description="Trust-space whitelist XML (listeblanche); default: a dev whitelist."
    )
    anchors: Path | None = Field(
        None,
        description="PEM bundle of the CAs client certificates must chain to (IGC-Sante);"
        " default: the development CA.",
    )
    crls: list[Path] = Field(
        default_factory=list, description="PEM CRL files checked for client certificates."
    )
    require_client_certificate: bool = Field(
        True,
        description="Senders must present a certificate whose subject is the operator"
        " listed for their domain.",
    )
    reload_interval: float = Field(
        30.0, gt=0, description="Seconds between checks of whitelist, CRL and certificate files."
    )
    mssante_suffix: str = Field(
        ".mssante.fr", description="Domains ending so are MSSanté addresses (Reply-To contacts)."
    )


class NotifySettings(_Section):
    """Telling patients that a message waits (DOMAIN.md 3): e-mail worker and bounces."""

    webmail_url: str = Field("http://127.0.0.1:8080/", description="Link given in notifications.")
    activation_url: str = Field(
        "http://127.0.0.1:8080/activation",
        description="Where a profile not yet activated (status created) is activated.",
    )
    worker_enabled: bool = Field(
        True, description="Run the notification worker inside `mssante serve`."
    )
    transport: Literal["file", "smarthost"] = Field(
        "file",
        description="'file' writes .eml files into outbox_dir (development);"
        " 'smarthost' sends through the smarthost below.",
    )
    outbox_dir: Path | None = Field(
        None, description="Where the file transport writes; default data_dir/outbox-notifications."
    )
    smarthost_host: str = Field("127.0.0.1", description="Smarthost (relay) name or address.")
    smarthost_port: int = Field(587, ge=1, le=65535, description="Smarthost port (submission).")
    smarthost_starttls: bool = Field(
        True, description="Require STARTTLS with the smarthost (its certificate is verified)."
    )
    smarthost_ca: Path | None = Field(
        None, description="PEM CA bundle the smarthost certificate must chain to; default: system."
    )
    smarthost_username: str | None = Field(
        None, description="AUTH user name at the smarthost; no AUTH if unset."
    )
    smarthost_password: SecretStr | None = Field(None, description="AUTH password.")
    smarthost_timeout: float = Field(
        30.0, gt=0, description="Seconds one smarthost command may take (temporary failure after)."
    )
    from_address: str = Field(
        "ne-pas-repondre@notifications.patient.mssante.localhost",
        description="From address of notification e-mails (replies are not read).",
    )
    from_name: str = Field("Messagerie de santé", description="Display name of from_address.")
    bounce_domain: str = Field(
        "bounces.patient.mssante.localhost",
        description="Domain of the per-notification return paths (VERP bounce+<token>@domain);"
        " its MX must point to the bounce listener.",
    )
    bounce_host: str = Field("127.0.0.1", description="Address the bounce listener binds to.")
    bounce_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the bounce listener (25 behind the bounce domain's MX); off if unset.",
    )
    verp_secret: SecretStr | None = Field(
        None,
        description="HMAC key authenticating return paths; default: data_dir/verp.key, made on"
        " first use. Set the same value on every host that sends or receives bounces.",
    )
    coalesce_window: float = Field(
        900.0, ge=0, description="Seconds: at most one e-mail per person per window."
    )
    max_attempts: int = Field(
        8, ge=1, description="Sending attempts before a notification is marked failed."
    )
    backoff_base: float = Field(
        60.0, gt=0, description="Seconds before the first retry; doubled at each attempt."
    )
    backoff_max: float = Field(3600.0, gt=0, description="Longest wait between two attempts.")
    claim_lease: float = Field(
        300.0,
        gt=0,
        description="Seconds a worker owns the notifications it claimed; a crashed worker's"
        " come back after it (longer than a send can take).",
    )
    show_sender_name: bool = Field(
        False, description="Name the sender (display name only) in the e-mail."
    )
    dkim_selector: str = Field("notify", description="DKIM selector of notification e-mails.")
    dkim_domain: str | None = Field(
        None, description="DKIM signing domain (d=); default: the domain of from_address."
    )
    dkim_key_file: Path | None = Field(
        None,
        description="PEM private key (Ed25519 or RSA) for DKIM; default: a development key"
        " made in data_dir/dkim.",
    )
    poll_interval: float = Field(
        5.0, gt=0, description="Seconds the worker waits when nothing is due."
    )
    batch_size: int = Field(50, ge=1, description="Recipients a worker claims at once.")

    @field_validator("bounce_domain")
    @classmethod
    def _lower_bounce_domain(cls, value: str) -> str:
        return value.strip().lower().rstrip(".")

    def outbox_path(self, data_dir: Path) -> Path:
        return self.outbox_dir or data_dir / "outbox-notifications"


class OutboundSettings(_Section):
    """Mail leaving the patient domain (replies, read receipts, DSNs): the outbound queue."""

    worker_enabled: bool = Field(
        True, description="Run the outbound delivery worker inside `mssante serve`."
    )
    routes: dict[str, str] = Field(
        default_factory=dict,
        description="Static next hops, domain -> 'host:port' (tests, private networks);"
        " when empty, DNS MX records are used (port 25). A domain missing from a"
        " non-empty table is not delivered.",
    )
    client_cert: Path | None = Field(
        None,
        description="PEM client certificate chain presented to operators (mutual TLS);"
        " default: the SMTP server certificate (smtp.tls_cert, or the development one).",
    )
    client_key: Path | None = Field(None, description="PEM private key of client_cert.")
    verify_operator_dn: bool = Field(
        True,
        description="The peer's certificate subject must equal the DNCertificatOperateur"
        " listed for the recipient domain in the whitelist.",
    )
    dkim_selector: str = Field("patient", description="DKIM selector of outbound mail.")
    dkim_domain: str | None = Field(
        None, description="DKIM signing domain (d=); default: smtp.patient_domain."
    )
    dkim_key_file: Path | None = Field(
        None,
        description="PEM private key (Ed25519 or RSA) for DKIM; default: a development key"
        " made in data_dir/dkim.",
    )
    max_attempts: int = Field(
        30, ge=1, description="Delivery attempts per recipient before it is marked failed."
    )
    max_age: float = Field(
        432_000.0,
        gt=0,
        description="Seconds a message may stay queued before it fails (RFC 5321 4.5.4.1:"
        " 4-5 days; default 5 days).",
    )
    backoff_base: float = Field(
        300.0, gt=0, description="Seconds before the first retry; doubled at each attempt."
    )
    backoff_max: float = Field(14_400.0, gt=0, description="Longest wait between two attempts.")
    claim_lease: float = Field(
        900.0,
        gt=0,
        description="Seconds a worker owns the recipients it claimed; a crashed worker's"
        " come back after it (longer than a delivery can take).",
    )
    timeout: float = Field(
        60.0, gt=0, description="Seconds one SMTP step with an operator may take."
    )
    poll_interval: float = Field(
        5.0, gt=0, description="Seconds the worker waits when nothing is due."
    )
    batch_size: int = Field(
        50, ge=1, description="Recipients a worker claims at once (grouped per message and domain)."
    )
    concurrency: int = Field(
        8, ge=1, description="Deliveries (connections to operators) a worker runs at once."
    )

    @field_validator("routes", mode="before")
    @classmethod
    def _routes_from_env(cls, value: Any) -> Any:
        # MSSANTE_OUTBOUND__ROUTES='{"chu.mssante.fr": "10.0.0.5:25"}'
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"routes must be a JSON object: {exc}") from exc
        return value

    @field_validator("routes")
    @classmethod
    def _check_routes(cls, value: dict[str, str]) -> dict[str, str]:
        out = {}
        for domain, hop in value.items():
            host, sep, port = hop.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"route for {domain!r} must be 'host:port', not {hop!r}")
            out[domain.strip().lower().rstrip(".")] = hop
        return out


class DkimSettings(_Section):
    authserv_id: str | None = Field(
        None, description="Our name in Authentication-Results (RFC 8601); default smtp.hostname."
    )
    required_domains: list[str] = Field(
        default_factory=list,
        description="Author (From) domains whose mail must carry their own passing signature.",
    )
    dns_timeout: float = Field(5.0, gt=0, description="Seconds a DKIM key look-up may take.")


class LimitsSettings(_Section):
    """Abuse limits per peer identity (certificate subject, else IP): see smtp/limits.py."""

    messages_per_minute: int = Field(120, ge=1, description="Messages a peer may start per minute.")
    recipients_per_message: int = Field(
        100, ge=1, description="RCPT per message before 452 4.5.3 (RFC 5321 asks for 100)."
    )
    bad_recipients_per_session: int = Field(
        5, ge=1, description="Refused recipients in one session before every RCPT gets 450 4.7.1."
    )
    bad_recipients_per_day: int = Field(
        50, ge=1, description="Refused recipients per rolling 24 h before every RCPT gets 450."
    )
    close_after_bad_in_session: int = Field(
        10, ge=1, description="Strikes in one session before it is closed with 421."
    )
    tracked_identities: int = Field(
        10_000, ge=1, description="Peers remembered at most (least recently seen forgotten)."
    )


class ReplySettings(_Section):
    """What a patient may send back (issue 7: replies, outbound/replies.py)."""

    max_size: int = Field(
        10_000_000,
        ge=1,
        le=18_000_000,
        description="Largest patient reply in octets, text and attachments before encoding"
        " (base64 adds a third: 18 MB keeps the message under DOMAIN.md's 25 MB).",
    )
    max_attachments: int = Field(
        10, ge=0, le=100, description="Attachments a patient reply may carry."
    )


class RetentionSettings(_Section):
    trash_days: int = Field(
        30, ge=0, description="Days a message stays in a patient's trash before it is purged."
    )
    audit_days: int = Field(
        3650, ge=365, description="Days audit events are kept (at least one year)."
    )
    outbound_days: int = Field(
        7,
        ge=1,
        description="Days a finished outbound message (every recipient sent or failed) is "
        "kept in the queue before it is purged.",
    )


class WebSettings(_Section):
    """The patient webmail (issue 8, mssante/web)."""

    enabled: bool = Field(True, description="Serve the webmail from `mssante serve`.")
    host: str = Field("127.0.0.1", description="Address the webmail binds to.")
    port: int = Field(8080, ge=0, le=65535, description="Webmail HTTP(S) port.")
    tls_cert: Path | None = Field(
        None,
        description="PEM certificate chain of the webmail (HTTPS, HSTS). Without it the webmail"
        " speaks plain HTTP: only behind a TLS reverse proxy, or on loopback for development.",
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    behind_tls_proxy: bool = Field(
        False,
        description="A reverse proxy terminates TLS: cookies are marked Secure and HSTS is sent"
        " although the webmail itself speaks HTTP.",
    )
    idle_timeout: float = Field(
        900.0, gt=0, description="Seconds without a request after which a session ends."
    )
    absolute_timeout: float = Field(
        43_200.0, gt=0, description="Seconds after login after which a session ends in any case."
    )
    activation_code_days: int = Field(
        42, ge=1, le=365, description="Days a provisional activation code stays valid (6 weeks)."
    )
    activation_code_attempts: int = Field(
        5, ge=1, le=20, description="Wrong tries after which a provisional code is spent."
    )
    email_code_minutes: int = Field(
        30, ge=1, le=1440, description="Minutes an e-mail confirmation code stays valid."
    )
    login_failures: int = Field(
        5, ge=1, le=100, description="Failed logins per identifier before a temporary lockout."
    )
    login_failures_per_address: int = Field(
        50, ge=1, description="Failed logins per client address before a temporary lockout."
    )
    lockout_seconds: float = Field(900.0, gt=0, description="How long a lockout lasts, in seconds.")
    page_size: int = Field(25, ge=5, le=200, description="Conversations per page of the list.")
    max_upload: int = Field(
        20_000_000,
        ge=1,
        description="Largest request body accepted (a reply form with its attachments), octets.",
    )


class AdminSettings(_Section):
    """The admin API for the insurer's account system (issue 9, mssante/admin)."""

    enabled: bool = Field(
        False, description="Serve the admin API from `mssante serve` (roles all and web)."
    )
    host: str = Field("127.0.0.1", description="Address the admin API binds to.")
    port: int = Field(8443, ge=0, le=65535, description="Admin API HTTPS port.")
    tls_cert: Path | None = Field(
        None, description="PEM certificate chain of the admin API; plain HTTP without it."
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    client_ca: Path | None = Field(
        None,
        description="PEM CA certificates: clients must present a certificate they issued"
        " (mutual TLS). Needs tls_cert.",
    )
    tokens_file: Path | None = Field(
        None,
        description="File of the SHA-256 hashes (hex, one per line) of the accepted bearer"
        " tokens; `mssante admin new-token` makes one.",
    )
    max_bulk: int = Field(
        10_000, ge=1, le=1_000_000, description="Largest number of changes in one bulk request."
    )

    @model_validator(mode="after")
    def _check_authentication(self) -> AdminSettings:
        # Each message names the keys, their values and the fix: the service
        # refuses to start rather than serve the directory to anyone.
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                f"admin.tls_cert = {_toml_value(str(self.tls_cert or ''))} and admin.tls_key ="
                f" {_toml_value(str(self.tls_key or ''))}: set both (HTTPS) or neither"
            )
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError(
                f"admin.client_ca = {_toml_value(str(self.client_ca))} needs TLS: set"
                " admin.tls_cert and admin.tls_key (mutual TLS is a TLS handshake)"
            )
        if not self.enabled:
            return self
        if self.client_ca is None and self.tokens_file is None:
            raise ValueError(
                "admin.enabled = true with neither admin.client_ca nor admin.tokens_file: set"
                " admin.client_ca (mutual TLS) and/or admin.tokens_file (bearer tokens, made by"
                " `mssante admin new-token`), or admin.enabled = false"
            )
        loopback = self.host in ("localhost", "::1") or self.host.startswith("127.")
        if self.tls_cert is None and not loopback:
            raise ValueError(
                f"admin.host = {_toml_value(self.host)} without admin.tls_cert: bearer tokens"
                " would cross the network in clear; set admin.tls_cert and admin.tls_key, or"
                ' bind to loopback (admin.host = "127.0.0.1") behind a TLS proxy'
            )
        return self


class OpsSettings(_Section):
    """Prometheus metrics and health probes for monitoring (issue 9, mssante/ops)."""

    enabled: bool = Field(True, description="Serve /metrics, /healthz and /readyz.")
    host: str = Field("127.0.0.1", description="Address the metrics endpoint binds to.")
    port: int = Field(
        9025,
        ge=0,
        le=65535,
        description="Metrics and probes HTTP port; with smtp.workers > 1, worker i listens on"
        " port + i.",
    )


class LogSettings(_Section):
    """What the service writes to its standard error."""

    format: Literal["text", "json"] = Field(
        "text",
        description="'json': one JSON object per line (one per SMTP transaction and per admin"
        " action, with the correlation id found in the audit trail); 'text' for a terminal.",
    )
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest level written."
    )


class Settings(_Section):
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    submission: SubmissionSettings = Field(default_factory=SubmissionSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    trust: TrustSettings = Field(default_factory=TrustSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    replies: ReplySettings = Field(default_factory=ReplySettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    dkim: DkimSettings = Field(default_factory=DkimSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    ops: OpsSettings = Field(default_factory=OpsSettings)
    log: LogSettings = Field(default_factory=LogSettings)


class SettingsError(Exception):
    """A configuration that cannot be used; the message names key, value and fix."""


def _env_overrides(environ: dict[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        out.setdefault(section, {})[key] = value
    return out


def load_settings(path: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"{path}: cannot read configuration: {exc}") from exc
    from_env: set[tuple[str, str]] = set()
    for section, values in _env_overrides(dict(os.environ if environ is None else environ)).items():
        data.setdefault(section, {}).update(values)
        from_env.update((section, key) for key in values)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        where = f" in {path}" if path is not None else ""
        lines = [_explain(err, from_env, where) for err in exc.errors()]
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from exc


def _explain(err: Any, from_env: set[tuple[str, str]], where: str) -> str:
    """One line per problem: the key, its value, where it was set, and the fix."""
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    source = where
    if len(loc) >= 2 and (loc[0], loc[1]) in from_env:
        source = f" from ${ENV_PREFIX}{loc[0].upper()}__{loc[1].upper()}"
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        fix = "unknown key: remove it"
        close = difflib.get_close_matches(loc[-1], known, n=1)
        if close:
            fix += f" or write {'.'.join([*loc[:-1], close[0]])!r}"
        return f"{key}{source}: {fix}"
    if err["type"] == "value_error" and len(loc) == 1:
        # A section's own check (a model validator): its message names the keys.
        return f"{key}{source}: {str(err['msg']).removeprefix('Value error, ')}"
    fix = str(err["msg"]).replace("Input should", "should", 1)
    description = _description(loc)
    hint = f" ({description})" if description else ""
    return f"{key} = {err.get('input')!r}{source}: {fix}{hint}"


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Settings
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _known_keys(loc: list[str]) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model is not None else []


def _description(loc: list[str]) -> str | None:
    model = _model_at(loc[:-1]) if loc else None
    field = model.model_fields.get(loc[-1]) if model is not None else None
    return field.description if field is not None else None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        pairs = (f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, int):
        return f"{value:_}" if value >= 10_000 else str(value)
    if isinstance(value, float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def example_toml() -> str:
    """The example configuration, generated from the schema (config/mssante.example.toml)."""
    lines = [
        "# mssante configuration: every key with its default.",
        "# Generated by `mssante config example`; a test fails when it drifts from the schema.",
        "# Environment variables MSSANTE_<SECTION>__<KEY> override the file.",
    ]
    defaults = Settings()
    for section in Settings.model_fields:
        lines += ["", f"[{section}]"]
        model = getattr(defaults, section)
        for key, field in type(model).model_fields.items():
            lines.append(f"# {field.description}")
            value = getattr(model, key)
            if value is None:
                lines.append(f"# {key} =")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


REFERENCE_START = "<!-- configuration reference: generated by `mssante config reference` -->"
REFERENCE_END = "<!-- end of the configuration reference -->"


def reference_markdown() -> str:
    """README.md's configuration reference, generated from the schema (a test
    fails when the README's copy drifts)."""
    lines = [REFERENCE_START, "", "| key | default | meaning |", "|---|---|---|"]
    defaults = Settings()
    for section in Settings.model_fields:
        model = getattr(defaults, section)
        for key, field in type(model).model_fields.items():
            value = getattr(model, key)
            shown = "unset" if value is None else f"`{_toml_value(value)}`"
            meaning = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{section}.{key}` | {shown} | {meaning} |")
    return "\n".join([*lines, "", REFERENCE_END]) + "\n"
