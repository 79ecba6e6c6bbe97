"""Keeps: database, blobs, conversations, the audit trail and the notification outbox."""
