"""The admin API for the insurer's account system (issue 9).

``api.py`` wires the FastAPI application (routes, errors, OpenAPI);
``schemas.py`` says what it accepts and answers; ``gate.py`` is what every
request goes through (correlation id, authentication, body limits, the log
line); ``auth.py`` checks certificates and tokens; ``problems.py`` names
every error; ``queues.py`` reads profiles and queue depths; ``server.py``
runs it under uvicorn; ``cli.py`` makes tokens.  Changes themselves are
store/patient_changes.py jobs.
"""
