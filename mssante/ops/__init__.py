"""Operations: the metrics and health endpoint (issue 9), on a port of its own."""
