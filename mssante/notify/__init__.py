"""Tells the patient: who is notified about a new message, and how."""
