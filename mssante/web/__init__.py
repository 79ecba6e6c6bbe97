"""The patient webmail (issue 8): server-rendered pages in French."""
