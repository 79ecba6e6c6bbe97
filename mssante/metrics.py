"""Prometheus metrics of one process: the instruments and the registry that owns them.

A :class:`Metrics` value is built by the wiring (app.py) and injected into
the parts that record (STYLE.md 9: never the global default registry, so a
test process runs several gateways side by side).  ``mssante/ops`` serves
it as ``GET /metrics``.

Labels are bounded, always: a listener name, a stage, a reply's constant
name (replies.py), a TLS failure reason from a fixed list (smtp/tls.py), a
channel, a status.  Never an address, an INS or free text.

The SMTP path is hot (bench/throughput.py): :class:`ListenerMetrics` binds
each listener's label children once, and caches the (stage, reason)
children, so recording is an attribute read and an ``inc()``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

# Time from the end of the message data to the 250 written: 1 ms .. 5 s.
T250_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Database transactions and queries: 0.5 ms .. 5 s.
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Jobs in one writer transaction (group commit); store.max_batch is 64 by default.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# The classic text format, which every Prometheus version reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class Metrics:
    """Every instrument of the process, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # --- SMTP (smtp/protocol.py, smtp/session.py) ---------------------------------
        self.smtp_sessions = Counter(
            "mssante_smtp_sessions",
            "SMTP connections opened (after the TLS handshake on implicit-TLS ports).",
            ["listener"],
            registry=r,
        )
        self.smtp_sessions_active = Gauge(
            "mssante_smtp_sessions_active",
            "SMTP connections open now.",
            ["listener"],
            registry=r,
        )
        self.smtp_messages_accepted = Counter(
            "mssante_smtp_messages_accepted",
            "Messages answered 2xx at the end of DATA or BDAT LAST (stored, or a DSN queued).",
            ["listener"],
            registry=r,
        )
        self.smtp_refusals = Counter(
            "mssante_smtp_refusals",
            "MAIL, RCPT and message data refused, by stage and reply name (replies.py).",
            ["listener", "stage", "reason"],
            registry=r,
        )
        self.smtp_time_to_250 = Histogram(
            "mssante_smtp_time_to_250_seconds",
            "From the end of the message data to the 2xx reply written.",
            ["listener"],
            buckets=T250_BUCKETS,
            registry=r,
        )
        self.tls_failures = Counter(
            "mssante_tls_handshake_failures",
            "Server-side TLS handshakes that failed, by reason (smtp/tls.py).",
            ["listener", "reason"],
            registry=r,
        )
        # --- notifications and the outbound queue (workers) ----------------------------
        self.notifications = Counter(
            "mssante_notifications",
            "Notification e-mails: sent, deferred (temporary failure) or failed for good.",
            ["channel", "outcome"],
            registry=r,
        )
        self.outbound_recipients = Counter(
            "mssante_outbound_recipients",
            "Outbound recipients recorded sent or failed for good (outbound/worker.py).",
            ["outcome"],
            registry=r,
        )
        # --- read from the database when scraped (ops/queues.py) -----------------------
        self.outbound_queue = Gauge(
            "mssante_outbound_queue_recipients",
            "Outbound recipients still to send (pending) or set aside (held).",
            ["status"],
            registry=r,
        )
        self.outbound_oldest = Gauge(
            "mssante_outbound_queue_oldest_age_seconds",
            "Age of the oldest message with a recipient still pending (0 when none).",
            registry=r,
        )
        self.db_up = Gauge(
            "mssante_db_up",
            "1 when the database answered the queue queries of this scrape, else 0"
            " (the queue gauges then keep their previous values).",
            registry=r,
        )
        self.notifications_pending = Gauge(
            "mssante_notifications_pending",
            "Notifications waiting to be sent, by channel.",
            ["channel"],
            registry=r,
        )
        # --- database (store/writer.py, ops/health.py) ---------------------------------
        self.db_transaction = Histogram(
            "mssante_db_writer_transaction_seconds",
            "One writer transaction (a group commit): its jobs and the commit.",
            buckets=DB_BUCKETS,
            registry=r,
        )
        self.db_commit = Histogram(
            "mssante_db_writer_commit_seconds",
            "The COMMIT of a writer transaction (the fsync).",
            buckets=DB_BUCKETS,
            registry=r,
        )
        self.db_batch_jobs = Histogram(
            "mssante_db_writer_batch_jobs",
            "Jobs committed together by one writer transaction.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.db_readiness = Histogram(
            "mssante_db_readiness_query_seconds",
            "The readiness probe's database check (SELECT 1 and the schema version).",
            buckets=DB_BUCKETS,
            registry=r,
        )
        self._listeners: dict[str, ListenerMetrics] = {}

    def listener(self, name: str) -> ListenerMetrics:
        """The instruments of one SMTP listener (mx, submission, bounce)."""
        found = self._listeners.get(name)
        if found is None:
            found = self._listeners[name] = ListenerMetrics(self, name)
        return found

    def notification(self, channel: str, outcome: str) -> None:
        self.notifications.labels(channel, outcome).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)


class ListenerMetrics:
    """One listener's label children, bound once."""

    def __init__(self, metrics: Metrics, listener: str) -> None:
        self.name = listener
        self.sessions = metrics.smtp_sessions.labels(listener)
        self.sessions_active = metrics.smtp_sessions_active.labels(listener)
        self.accepted = metrics.smtp_messages_accepted.labels(listener)
        self.time_to_250 = metrics.smtp_time_to_250.labels(listener)
        self._refusals = metrics.smtp_refusals
        self._tls_failures = metrics.tls_failures
        self._refused: dict[tuple[str, str], Counter] = {}
        self._tls_failed: dict[str, Counter] = {}

    def refused(self, stage: str, reason: str) -> None:
        """``stage``: mail, rcpt or data; ``reason``: a reply's name (replies.py)."""
        child = self._refused.get((stage, reason))
        if child is None:
            child = self._refusals.labels(self.name, stage, reason or "unnamed")
            self._refused[(stage, reason)] = child
        child.inc()

    def tls_failed(self, reason: str) -> None:
        child = self._tls_failed.get(reason)
        if child is None:
            child = self._tls_failed[reason] = self._tls_failures.labels(self.name, reason)
        child.inc()
