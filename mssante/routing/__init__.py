"""Decides: the INS, recipient verdicts and the trust space."""
