"""Mail leaving the patient domain: replies, read receipts, DSNs (issue #7)."""
