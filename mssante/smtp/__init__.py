"""Speaks SMTP: the listener, the session policy, the DATA phase and the reply table."""
