"""Static checks of the container files (issue 9 item 6).

``docker/Dockerfile``, ``docker/compose.yaml``, ``docker/mssante.toml`` and
the root ``.dockerignore`` cannot be built here (no Docker engine in CI), so
this reads them and checks what would otherwise only fail at build or at
``docker compose up``: every ``mssante`` command line parses with the real
click commands, every ``MSSANTE_<SECTION>__<KEY>`` names a settings field,
the containers' configuration validates, the health check asks the ops port
for a path it serves, the image runs as a fixed non-root uid, ports are
published on loopback only while the processes listen on every interface
of their container, all processes share one data directory, and so on.

Each check is a function of a :class:`Files` value that returns the
problems it found; the negative tests at the end break a copy of the files
and assert that the matching check reports it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, cast
from unittest import mock
from urllib.parse import urlsplit

import click
import pytest
import yaml
from sqlalchemy.engine import make_url

from mssante.cli import main as mssante_main
from mssante.clock import SystemClock
from mssante.metrics import Metrics
from mssante.ops.app import create_app as create_ops_app
from mssante.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"

REQUIRED_SERVICES = ("postgres", "migrate", "gateway", "worker", "web", "mailpit")
# What each mssante service must run (the image's ENTRYPOINT is `mssante`).
EXPECTED_ARGS = {
    "migrate": ["db", "upgrade"],
    "gateway": ["serve", "--role", "gateway"],
    "worker": ["serve", "--role", "worker"],
    "web": ["serve", "--role", "web"],
}
ONE_SHOT = ("migrate", "cli")  # run to completion: no restart, no health check
# Never in the build context: tests, the developer's venv and data, secrets.
NEVER_IN_CONTEXT = (
    "tests/test_containers.py",
    ".venv/bin/python",
    ".git/HEAD",
    "mssante-data/mssante.db",
    "docker/.env",
    "docker/secrets/keys/a.key",
)
# Variables the image's entry point reads that are not settings fields.
SPECIAL_ENV = {"MSSANTE_CONFIG", "MSSANTE_MASTER_KEY"}
LISTEN_ANY = {"0.0.0.0", "::"}


# --- the files ---------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Files:
    """The container files as text and data; negative tests replace one field."""

    dockerfile: str
    compose: dict[str, Any]  # as written: before ${VAR} interpolation
    env_example: str
    dockerignore: str
    pyproject: str
    compose_dir: Path = DOCKER
    root: Path = ROOT


def load_files() -> Files:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    return Files(
        dockerfile=(DOCKER / "Dockerfile").read_text(encoding="utf-8"),
        # A JSON round trip undoes YAML aliases: a test may break one service alone.
        compose=json.loads(json.dumps(compose)),
        env_example=(DOCKER / "env.example").read_text(encoding="utf-8"),
        dockerignore=(ROOT / ".dockerignore").read_text(encoding="utf-8"),
        pyproject=(ROOT / "pyproject.toml").read_text(encoding="utf-8"),
    )


# --- Dockerfile ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    stage: int  # index of the FROM it follows
    keyword: str
    flags: dict[str, str]
    value: str

    def exec_form(self) -> list[str] | None:
        if not self.value.startswith("["):
            return None
        parsed = json.loads(self.value)
        return [str(a) for a in parsed]


@dataclass(frozen=True)
class Dockerfile:
    instructions: list[Instruction]
    stages: list[tuple[str, str | None]]  # (image, name)

    def final(self, keyword: str) -> list[Instruction]:
        last = len(self.stages) - 1
        return [i for i in self.instructions if i.stage == last and i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """ENV of the final stage (what `docker run` starts with)."""
        out: dict[str, str] = {}
        for ins in self.final("ENV"):
            for word in shlex.split(ins.value):
                name, _, value = word.partition("=")
                out[name] = value
        return out

    def files(self, root: Path) -> dict[str, Path]:
        """Container path -> local file, for the files COPY puts in the final stage."""
        out = {}
        for ins in self.final("COPY"):
            words = shlex.split(ins.value)
            if "from" in ins.flags or len(words) != 2 or words[1].endswith("/"):
                continue
            out[words[1]] = root / words[0]
        return out

    def last_exec_form(self, keyword: str) -> list[str]:
        """The final stage's ENTRYPOINT or CMD (the last one counts), exec form only."""
        found = self.final(keyword)
        return (found[-1].exec_form() or []) if found else []

    def argv(self) -> list[str]:
        return self.last_exec_form("ENTRYPOINT") + self.last_exec_form("CMD")


def parse_dockerfile(text: str) -> Dockerfile:
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comments (also inside continuations) and blank lines
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)
    instructions: list[Instruction] = []
    stages: list[tuple[str, str | None]] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        flags = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append((words[0] if words else "", alias))
        instructions.append(Instruction(max(len(stages) - 1, 0), keyword, flags, rest))
    return Dockerfile(instructions, stages)


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN line, without redirections."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    tokens = list(lexer)
    skip = False
    for i, token in enumerate(tokens):
        if skip:
            skip = False
        elif token in {"&&", "||", ";", "|", "&"}:
            commands.append([])
        elif token in {">", ">>", "<", ">&", "&>"}:
            skip = True  # the file name that follows
        elif token.isdigit() and i + 1 < len(tokens) and tokens[i + 1] in {">", ">>", ">&"}:
            continue  # 2> ...
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


# --- compose -------------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_]\w*))")


def interpolate(value: Any, env: Mapping[str, str], problems: list[str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error}, $$ in every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, problems) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if op in {"-", ":-"}:
            return env[name] if present else arg
        if op in {"?", ":?"} and not present:
            problems.append(f"${{{name}}} is required and unset: {arg}")
            return ""
        if op in {"+", ":+"}:
            return arg if present else ""
        return env.get(name, "")

    return _VAR.sub(one, value)


def variables(value: Any) -> list[tuple[str, str | None, str]]:
    """(name, operator, argument) of every interpolation in a compose document."""
    if isinstance(value, dict):
        return [v for item in value.values() for v in variables(item)]
    if isinstance(value, list):
        return [v for item in value for v in variables(item)]
    if not isinstance(value, str):
        return []
    return [
        (m.group(1) or m.group(4), m.group(2), m.group(3) or "")
        for m in _VAR.finditer(value)
        if m.group(0) != "$$"
    ]


def env_example(files: Files) -> dict[str, str]:
    out = {}
    for line in files.env_example.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


def resolved(files: Files) -> tuple[dict[str, Any], list[str]]:
    """The compose document as `docker compose config` would see it with a filled .env."""
    env = {name: value or f"test{name.lower()}0123" for name, value in env_example(files).items()}
    problems: list[str] = []
    return interpolate(files.compose, env, problems), problems


def services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose.get("services") or {})


def mssante_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run our image: those that build it and those naming it."""
    svcs = services(compose)
    built = {s.get("image") for s in svcs.values() if "build" in s}
    return {n: s for n, s in svcs.items() if "build" in s or s.get("image") in built}


def environment(service: Mapping[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return dict(env)


def words(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def service_argv(service: Mapping[str, Any], image: Dockerfile) -> list[str]:
    if "entrypoint" in service:  # compose: a new entrypoint drops the image's CMD
        return words(service["entrypoint"]) + words(service.get("command"))
    command = service.get("command")
    return image.last_exec_form("ENTRYPOINT") + (
        words(command) if command is not None else image.last_exec_form("CMD")
    )


def role_of(argv: Sequence[str]) -> str | None:
    """The role of a `mssante serve` command line, None for other commands."""
    args = list(argv[1:])
    if not args or args[0] != "serve":
        return None
    for i, arg in enumerate(args):
        if arg == "--role" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--role="):
            return arg.partition("=")[2]
    return "all"


@dataclass(frozen=True)
class Mount:
    kind: str  # volume, bind, tmpfs
    source: str
    target: str
    read_only: bool


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    out = []
    for item in service.get("volumes") or []:
        if isinstance(item, str):
            parts = item.split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
            named = source and not source.startswith((".", "/", "~"))
            mode = parts[2].split(",") if len(parts) > 2 else []
            out.append(Mount("volume" if named else "bind", source, target, "ro" in mode))
        else:
            out.append(
                Mount(
                    item.get("type", "volume"),
                    str(item.get("source", "")),
                    str(item.get("target", "")),
                    bool(item.get("read_only", False)),
                )
            )
    return out


@dataclass(frozen=True)
class Port:
    host_ip: str | None
    published: str | None
    target: int | None


def ports(service: Mapping[str, Any]) -> list[Port]:
    out = []
    for item in service.get("ports") or []:
        if isinstance(item, dict):
            target, published = item.get("target"), item.get("published")
            out.append(
                Port(
                    item.get("host_ip"),
                    str(published) if published is not None else None,
                    int(target) if target is not None else None,
                )
            )
            continue
        text = str(item).rpartition("/")[0] if "/" in str(item) else str(item)
        host_ip = None
        if text.startswith("["):  # [::1]:8080:80
            host_ip, _, text = text[1:].partition("]:")
        parts = text.split(":")
        if len(parts) == 3:
            host_ip, published, target_s = parts
        elif len(parts) == 2:
            published, target_s = parts
        else:
            published, target_s = None, parts[0]
        out.append(Port(host_ip, published, int(target_s) if target_s.isdigit() else None))
    return out


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def seconds(duration: Any) -> float | None:
    """A compose duration ("1m30s") in seconds; None if it is not one."""
    if not isinstance(duration, str) or not duration:
        return None
    parts = _DURATION.findall(duration)
    if "".join(n + u for n, u in parts) != duration:
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts)


def local_path(files: Files, source: str) -> Path:
    return (files.compose_dir / source).resolve()


def container_files(files: Files, service: Mapping[str, Any]) -> dict[str, Path]:
    """Container path -> local file: the image's COPY, then the service's bind mounts."""
    out = parse_dockerfile(files.dockerfile).files(files.root)
    for m in mounts(service):
        if m.kind == "bind":
            out[m.target] = local_path(files, m.source)
    return out


def container_env(files: Files, service: Mapping[str, Any]) -> dict[str, str]:
    env = parse_dockerfile(files.dockerfile).env()
    env.update({k: str(v) for k, v in environment(service).items()})
    return env


def service_settings(files: Files, service: Mapping[str, Any]) -> Settings:
    """The settings a process of this service loads (file and environment), or SettingsError."""
    env = container_env(files, service)
    config = env.get("MSSANTE_CONFIG")
    path = None
    if config:
        path = container_files(files, service).get(config)
        if path is None:
            raise SettingsError(f"MSSANTE_CONFIG={config}: no file is copied or mounted there")
    return load_settings(path, environ=env)


def probe_paths() -> set[str]:
    """Paths the ops endpoint serves (its app is built without a store: the
    store is only used when a request comes)."""
    app = create_ops_app(cast(Any, None), metrics=Metrics(), clock=SystemClock())
    return {getattr(route, "path", "") for route in app.routes}


# --- the mssante command --------------------------------------------------------------------


def cli_problems(
    argv: Sequence[str],
    files: Mapping[str, Path] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Parse ``mssante ARGS`` with the real click commands, as the entry point would.

    Unknown commands or options, missing arguments and invalid values raise
    (``resilient_parsing`` stays off); nothing is invoked. Container paths
    in ``files`` (and ``MSSANTE_CONFIG``) are read from their local copies.
    """
    line = shlex.join(argv)
    if not argv or PurePosixPath(argv[0]).name != "mssante":
        return [f"`{line}`: not the mssante command"]
    files = files or {}
    args = [str(files.get(a, a)) for a in argv[1:]]
    env = {k: str(files.get(v, v)) for k, v in (environ or {}).items()}
    command: click.Command = mssante_main
    name = "mssante"
    parent: click.Context | None = None
    contexts: list[click.Context] = []
    try:
        # Help goes to a buffer; the environment is the container's.
        with (
            mock.patch.dict(os.environ, env, clear=True),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            while isinstance(command, click.Group):
                ctx = command.context_class(
                    command, info_name=name, parent=parent, **command.context_settings
                )
                contexts.append(ctx)
                rest: list[str] = []
                if args:
                    with ctx.scope(cleanup=False):
                        # The base parser leaves the subcommand and its arguments.
                        rest = click.Command.parse_args(command, ctx, args)
                if not rest:
                    return [f"`{line}`: `{ctx.command_path}` needs a command"]
                sub_name, sub, args = command.resolve_command(ctx, rest)
                assert sub is not None and sub_name is not None
                command, name, parent = sub, sub_name, ctx
            contexts.append(command.make_context(name, args, parent=parent))
    except click.exceptions.Exit:  # --help, --version
        return []
    except click.ClickException as exc:
        return [f"`{line}`: {exc.format_message()}"]
    finally:
        for ctx in reversed(contexts):
            ctx.close()
    return []


# --- the checks ---------------------------------------------------------------------------------

Check = Callable[[Files], list[str]]


def check_services(files: Files) -> list[str]:
    names = services(files.compose)
    problems = [f"service {n} missing" for n in REQUIRED_SERVICES if n not in names]
    ours = mssante_services(files.compose)
    problems += [f"{n} does not run the mssante image" for n in EXPECTED_ARGS if n not in ours]
    return problems


def check_images(files: Files) -> list[str]:
    problems = []
    ours = mssante_services(files.compose)
    dockerfile = (DOCKER / "Dockerfile").resolve()
    if len({s.get("image") for s in ours.values()}) > 1:
        problems.append("the mssante services run different images")
    for name, svc in ours.items():
        build = svc.get("build")
        if build is None:
            continue
        if not isinstance(build, dict):
            problems.append(f"{name}: build must name docker/Dockerfile (context: the root)")
            continue
        context = local_path(files, str(build.get("context", ".")))
        if context != files.root.resolve():
            problems.append(f"{name}: build context {context} is not the repository root")
        if (context / str(build.get("dockerfile", "Dockerfile"))).resolve() != dockerfile:
            problems.append(f"{name}: builds {build.get('dockerfile')}, not docker/Dockerfile")
    for name, svc in services(files.compose).items():
        image = str(svc.get("image", ""))
        tag = image.rpartition("/")[2].partition(":")[2]
        if name not in ours and (not tag or tag == "latest"):
            problems.append(f"{name}: image {image!r} is not pinned by a tag")
    return problems


def check_commands(files: Files) -> list[str]:
    """Every `mssante ...` in the Dockerfile and the compose file parses."""
    problems = []
    image = parse_dockerfile(files.dockerfile)
    # What a RUN line sees: the files copied and the ENV set before it, in its stage.
    copied: dict[str, Path] = {}
    env: dict[str, str] = {}
    stage = 0
    for ins in image.instructions:
        if ins.stage != stage:
            stage, copied, env = ins.stage, {}, {}
        if ins.keyword == "COPY" and "from" not in ins.flags:
            words_ = shlex.split(ins.value)
            if len(words_) == 2 and not words_[1].endswith("/"):
                copied[words_[1]] = files.root / words_[0]
        elif ins.keyword == "ENV":
            env.update(w.partition("=")[::2] for w in shlex.split(ins.value))
        elif ins.keyword == "RUN":
            for argv in shell_commands(ins.value):
                if PurePosixPath(argv[0]).name == "mssante":
                    found = cli_problems(argv, copied, env)
                    problems += [f"Dockerfile RUN: {p}" for p in found]
    argv = image.argv()
    found = cli_problems(argv, image.files(files.root), image.env())
    problems += [f"Dockerfile ENTRYPOINT/CMD: {p}" for p in found]
    compose, _ = resolved(files)
    for name, svc in mssante_services(compose).items():
        argv = service_argv(svc, image)
        where = container_files(files, svc)
        problems += [f"{name}: {p}" for p in cli_problems(argv, where, container_env(files, svc))]
        expected = EXPECTED_ARGS.get(name)
        if expected is not None and argv[1:] != expected:
            problems.append(f"{name}: runs {shlex.join(argv)}, not mssante {shlex.join(expected)}")
    return problems


def check_environment(files: Files) -> list[str]:
    """MSSANTE_<SECTION>__<KEY> name settings fields; values are strings."""
    problems = []
    for name, svc in services(files.compose).items():
        for var, value in environment(svc).items():
            if not isinstance(value, str):
                # Compose wants strings; YAML would make `false` a boolean.
                problems.append(f"{name}: {var} = {value!r} must be a quoted string")
            if not var.startswith("MSSANTE_") or var in SPECIAL_ENV:
                continue
            section, sep, key = var.removeprefix("MSSANTE_").lower().partition("__")
            model = Settings.model_fields.get(section)
            if not sep:
                problems.append(f"{name}: {var} is ignored (MSSANTE_<SECTION>__<KEY>)")
            elif model is None or model.annotation is None:
                problems.append(f"{name}: {var}: no settings section {section!r}")
            elif key not in model.annotation.model_fields:
                problems.append(f"{name}: {var}: no key {key!r} in [{section}]")
    return problems


def check_settings(files: Files) -> list[str]:
    """The image's configuration, and each service's with its environment, validate."""
    compose, problems = resolved(files)
    try:
        service_settings(files, {})  # `docker run` without compose
    except SettingsError as exc:
        problems.append(f"image: {exc}")
    for name, svc in mssante_services(compose).items():
        try:
            service_settings(files, svc)
        except SettingsError as exc:
            problems.append(f"{name}: {exc}")
    return problems


def serve_services(files: Files) -> tuple[dict[str, tuple[str, Settings]], list[str]]:
    """Services that run `mssante serve`: name -> (role, settings); problems on the way."""
    compose, problems = resolved(files)
    image = parse_dockerfile(files.dockerfile)
    out = {}
    for name, svc in mssante_services(compose).items():
        role = role_of(service_argv(svc, image))
        if role is None:
            continue
        try:
            out[name] = (role, service_settings(files, svc))
        except SettingsError as exc:
            problems.append(f"{name}: {exc}")
    return out, problems


def check_listen_hosts(files: Files) -> list[str]:
    """Inside a container, listeners bind every interface, or nothing reaches them."""
    found, problems = serve_services(files)
    for name, (_, s) in found.items():
        for key, host in {
            "smtp.host": s.smtp.host,
            "submission.host": s.submission.host,
            "web.host": s.web.host,
            "admin.host": s.admin.host,
            "ops.host": s.ops.host,
            "notify.bounce_host": s.notify.bounce_host,
        }.items():
            if host not in LISTEN_ANY:
                problems.append(f"{name}: {key} = {host!r} is unreachable from outside")
    return problems


def _probe_problems(where: str, argv: Sequence[str], ops_port: int) -> list[str]:
    if not argv or PurePosixPath(argv[0]).name.rstrip("0123456789.") != "python":
        return [f"{where}: {shlex.join(argv)}: use Python's stdlib (no curl in slim images)"]
    urls = re.findall(r"https?://[^\s'\"]+", " ".join(argv))
    if len(urls) != 1:
        return [f"{where}: one probe URL expected, found {urls}"]
    url = urlsplit(urls[0])
    problems = []
    if url.hostname not in {"127.0.0.1", "localhost", "::1"}:
        problems.append(f"{where}: probe {urls[0]} is not the container's loopback")
    if url.port != ops_port:
        problems.append(f"{where}: probe port {url.port} is not ops.port {ops_port}")
    if url.path not in probe_paths():
        problems.append(f"{where}: probe path {url.path!r} is not served ({probe_paths()})")
    return problems


def check_healthcheck(files: Files) -> list[str]:
    image = parse_dockerfile(files.dockerfile)
    checks = image.final("HEALTHCHECK")
    if not checks:
        return ["Dockerfile: no HEALTHCHECK in the runtime stage"]
    kind, _, rest = checks[-1].value.partition(" ")
    if kind.upper() != "CMD":
        return [f"Dockerfile: HEALTHCHECK {kind}"]
    argv = json.loads(rest) if rest.strip().startswith("[") else shlex.split(rest)
    problems = []
    try:
        problems += _probe_problems(
            "Dockerfile HEALTHCHECK", argv, service_settings(files, {}).ops.port
        )
    except SettingsError as exc:
        problems.append(f"image: {exc}")
    found, more = serve_services(files)
    problems += more
    compose, _ = resolved(files)
    for name, (_, s) in found.items():
        svc = services(compose)[name]
        test = (svc.get("healthcheck") or {}).get("test")
        if (svc.get("healthcheck") or {}).get("disable") or test == ["NONE"]:
            problems.append(f"{name}: health check disabled")
        elif test is not None:
            probe = words(test)[1:] if words(test)[0] in {"CMD", "CMD-SHELL"} else words(test)
            problems += _probe_problems(name, probe, s.ops.port)
        else:
            problems += _probe_problems(f"{name} (image HEALTHCHECK)", argv, s.ops.port)
    return problems


def check_dockerfile(files: Files) -> list[str]:
    image = parse_dockerfile(files.dockerfile)
    problems = []
    if len(image.stages) < 2:
        problems.append("Dockerfile: one stage; build in one, run in a slim one")
    names = {name for _, name in image.stages if name}
    for base, _ in image.stages:
        tag = base.rpartition("/")[2].partition(":")[2]
        if base not in names and (not tag or tag == "latest"):
            problems.append(f"Dockerfile: FROM {base} is not pinned by a tag")
    sources = {i.flags["from"] for i in image.final("COPY") if "from" in i.flags}
    if len(image.stages) >= 2 and not sources & names:
        problems.append("Dockerfile: the runtime stage copies nothing from the build stage")
    if any(i.value.split()[0] in {".", "./"} for i in image.instructions if i.keyword == "COPY"):
        problems.append("Dockerfile: COPY . brings the whole context (tests, venv) in")
    users = image.final("USER")
    uid = users[-1].value.partition(":")[0] if users else ""
    if not users or uid in {"", "root", "0"}:
        problems.append("Dockerfile: the runtime stage runs as root (USER)")
    elif not uid.isdigit():
        # Kubernetes' runAsNonRoot can only verify a numeric user.
        problems.append(f"Dockerfile: USER {uid} is not a fixed numeric uid")
    entry = image.final("ENTRYPOINT")
    if not entry or (entry[-1].exec_form() or [""])[0].rpartition("/")[2] != "mssante":
        problems.append('Dockerfile: ENTRYPOINT must be ["mssante"] (exec form)')
    cmd = image.final("CMD")
    if not cmd or cmd[-1].exec_form() is None:
        problems.append("Dockerfile: CMD must be in exec form")
    try:
        s = service_settings(files, {})
    except SettingsError as exc:
        return [*problems, f"image: {exc}"]
    exposed = {int(p.partition("/")[0]) for i in image.final("EXPOSE") for p in i.value.split()}
    wanted = {s.smtp.port, s.submission.port, s.web.port, s.admin.port, s.ops.port}
    problems += [f"Dockerfile: port {p} not EXPOSEd" for p in sorted(wanted - exposed)]
    data_dir = str(s.store.data_dir)
    if uid and not any(
        _owns(cmd, data_dir, uid) for i in image.final("RUN") for cmd in shell_commands(i.value)
    ):
        problems.append(f"Dockerfile: {data_dir} is not created owned by uid {uid}")
    return problems


def _owns(argv: list[str], path: str, uid: str) -> bool:
    """``install -d -o UID ... PATH`` or ``chown UID[:GID] ... PATH``."""
    if path not in argv:
        return False
    if argv[0] == "install" and "-d" in argv and "-o" in argv:
        return argv[argv.index("-o") + 1] == uid
    return argv[0] == "chown" and len(argv) > 2 and argv[-2].partition(":")[0] == uid


def ignored(patterns: str, path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last match wins)."""
    result = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in patterns.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        variants = {pattern, pattern.removeprefix("**/")}
        if any(_glob(v, p) for v in variants for p in prefixes):
            result = not negate
    return result


def _glob(pattern: str, path: str) -> bool:
    # Go's filepath.Match: `*` stays within one path element; `**` crosses them.
    regex = "".join(
        ".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?" else re.escape(tok)
        for tok in re.split(r"(\*\*|\*|\?)", pattern)
    )
    return re.fullmatch(regex, path) is not None


def check_dockerignore(files: Files) -> list[str]:
    problems = [
        f".dockerignore lets {p} into the build context"
        for p in NEVER_IN_CONTEXT
        if not ignored(files.dockerignore, p)
    ]
    for ins in parse_dockerfile(files.dockerfile).instructions:
        if ins.keyword != "COPY" or "from" in ins.flags:
            continue
        for source in shlex.split(ins.value)[:-1]:
            source = source.rstrip("/")
            if not (files.root / source).exists():
                problems.append(f"Dockerfile: COPY {source}: no such file")
            elif ignored(files.dockerignore, source):
                problems.append(f"Dockerfile: COPY {source}, which .dockerignore leaves out")
    return problems


def check_package_data(files: Files) -> list[str]:
    """The image installs a wheel, not the work tree: each file the package
    reads at run time (templates, style sheet, migration template) must be in it."""
    config = tomllib.loads(files.pyproject).get("tool", {}).get("setuptools", {})
    package_data: dict[str, list[str]] = config.get("package-data", {})
    problems = []
    for path in sorted((files.root / "mssante").rglob("*")):
        if not path.is_file() or path.suffix in {".py", ".pyc"} or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(files.root).as_posix()
        if not any(
            _glob(f"{package.replace('.', '/')}/{pattern}", rel)
            or (package == "*" and _glob(f"**/{pattern}", rel))
            for package, patterns in package_data.items()
            for pattern in patterns
        ):
            problems.append(f"{rel} is left out of the wheel: [tool.setuptools.package-data]")
    return problems


ROLE_PORTS: dict[str, Callable[[Settings], set[int | None]]] = {
    "gateway": lambda s: {s.smtp.port, s.submission.port, s.submission.implicit_tls_port},
    "worker": lambda s: {s.notify.bounce_port},
    "web": lambda s: {s.web.port, s.admin.port},
}


def check_ports(files: Files) -> list[str]:
    """Published on 127.0.0.1 only, and only ports the service's role listens on."""
    compose, problems = resolved(files)
    for name, svc in services(compose).items():
        for port in ports(svc):
            if port.host_ip != "127.0.0.1":
                problems.append(f"{name}: port {port.target} published on {port.host_ip or 'all'}")
            if not port.published:
                problems.append(f"{name}: port {port.target} published on a random host port")
    found, more = serve_services(files)
    for name, (role, s) in found.items():
        listening: set[int | None] = {s.ops.port}
        for r, of in ROLE_PORTS.items():
            if role in {r, "all"}:
                listening |= of(s)
        for port in ports(services(compose)[name]):
            if port.target not in listening:
                problems.append(
                    f"{name}: publishes {port.target}, which role {role} does not serve"
                )
    if not any(p.target == 8025 for p in ports(services(compose).get("mailpit", {}))):
        problems.append("mailpit: its UI (8025) is not published")
    return [*problems, *more]


def check_volumes(files: Files) -> list[str]:
    """One data volume at store.data_dir and the keys at store.keys_dir, everywhere."""
    compose, problems = resolved(files)
    declared = set((compose.get("volumes") or {}).keys())
    data: set[tuple[str, str]] = set()
    for name, svc in mssante_services(compose).items():
        try:
            s = service_settings(files, svc)
        except SettingsError as exc:
            problems.append(f"{name}: {exc}")
            continue
        by_target = {m.target: m for m in mounts(svc)}
        mount = by_target.get(str(s.store.data_dir))
        if mount is None or mount.kind != "volume":
            problems.append(f"{name}: no named volume at store.data_dir {s.store.data_dir}")
        else:
            data.add((mount.source, mount.target))
            if mount.source not in declared:
                problems.append(f"{name}: volume {mount.source} not declared")
            if mount.read_only:
                problems.append(f"{name}: the data volume is read-only")
        keys = str(s.store.keys_path())
        if keys.startswith(str(s.store.data_dir) + "/"):
            problems.append(f"{name}: store.keys_dir {keys} is inside the data volume")
        if keys not in by_target:
            problems.append(f"{name}: nothing mounted at store.keys_dir {keys}")
        config = container_env(files, svc).get("MSSANTE_CONFIG", "")
        if config in by_target and not by_target[config].read_only:
            problems.append(f"{name}: the configuration {config} is mounted writable")
    if len(data) > 1:
        problems.append(f"the services mount different data volumes: {sorted(data)}")
    return problems


def check_stop_grace(files: Files) -> list[str]:
    """Docker's SIGKILL must come after smtp.shutdown_grace has let sessions finish."""
    found, problems = serve_services(files)
    compose, _ = resolved(files)
    for name, (_, s) in found.items():
        grace = services(compose)[name].get("stop_grace_period")
        value = seconds(grace)
        if value is None:
            problems.append(f"{name}: stop_grace_period {grace!r} (Docker's default is 10 s)")
        elif value <= s.smtp.shutdown_grace:
            problems.append(
                f"{name}: stop_grace_period {grace} is not longer than"
                f" smtp.shutdown_grace {s.smtp.shutdown_grace} s"
            )
    return problems


def _has_healthcheck(files: Files, svc: Mapping[str, Any], ours: bool) -> bool:
    check = svc.get("healthcheck") or {}
    if check.get("disable") or check.get("test") == ["NONE"]:
        return False
    return "test" in check or (
        ours and bool(parse_dockerfile(files.dockerfile).final("HEALTHCHECK"))
    )


def check_depends_on(files: Files) -> list[str]:
    compose, problems = resolved(files)
    svcs = services(compose)
    ours = mssante_services(compose)
    found, _ = serve_services(files)
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in svcs.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            condition = (spec or {}).get("condition", "service_started")
            if dep not in svcs:
                problems.append(f"{name}: depends on {dep}, which does not exist")
            elif condition not in conditions:
                problems.append(f"{name}: depends on {dep} with condition {condition!r}")
            elif condition == "service_healthy" and not _has_healthcheck(
                files, svcs[dep], dep in ours
            ):
                problems.append(f"{name}: waits for {dep} to be healthy; it has no health check")
        if name in found and deps.get("migrate", {}).get("condition") != (
            "service_completed_successfully"
        ):
            problems.append(f"{name}: must start after migrate completed successfully")
        if (
            name in ours
            and "postgres" in svcs
            and (deps.get("postgres") or {}).get("condition") != "service_healthy"
        ):
            problems.append(f"{name}: must wait for postgres to be healthy")
    return problems


def check_restart(files: Files) -> list[str]:
    compose, problems = resolved(files)
    for name, svc in services(compose).items():
        restart = svc.get("restart")
        if restart is not None and not isinstance(restart, str):
            problems.append(f"{name}: restart {restart!r}: quote it (YAML reads no as false)")
        elif name in ONE_SHOT and restart != "no":
            problems.append(f'{name}: a one-shot service must have restart "no"')
        elif name not in ONE_SHOT and restart not in {"always", "unless-stopped"}:
            problems.append(f"{name}: restart {restart!r}; a lasting service comes back")
    return problems


_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|MASTER_KEY", re.IGNORECASE)


def _required_interpolation(text: str) -> bool:
    m = _VAR.fullmatch(text)
    return m is not None and m.group(2) in {":?", "?"}


def _url_password(text: str) -> str | None:
    """The password of a URL as written, interpolations kept (their text may hold '/')."""
    if "://" not in text:
        return None
    kept: list[str] = []

    def mask(m: re.Match[str]) -> str:
        kept.append(m.group(0))
        return f"VAR{len(kept) - 1}X"

    password = urlsplit(_VAR.sub(mask, text)).password
    if password is None:
        return None
    return re.sub(r"VAR(\d+)X", lambda m: kept[int(m.group(1))], password)


def check_secrets(files: Files) -> list[str]:
    """No secret in the compose file: each comes from docker/.env, required, no default."""
    listed = env_example(files)
    problems = [
        f"env.example gives {n} a value; it must stay empty" for n, v in listed.items() if v
    ]
    for name, op, _ in variables(files.compose):
        if name not in listed:
            problems.append(f"${{{name}}} is not listed in docker/env.example")
        if _SECRET_NAME.search(name) and op not in {":?", "?"}:
            problems.append(f"${{{name}}} has a default or may be empty: require it (:?)")
    for name, svc in services(files.compose).items():
        for var, value in environment(svc).items():
            text = str(value)
            if _SECRET_NAME.search(var) and not _required_interpolation(text):
                problems.append(f"{name}: {var} is written in the compose file")
            password = _url_password(text)
            if password is not None and not _required_interpolation(password):
                problems.append(f"{name}: {var} holds a password")
    missing: list[str] = []
    interpolate(files.compose, {}, missing)
    if not missing:
        problems.append("compose starts without docker/.env: a secret has a default")
    return problems


def check_database(files: Files) -> list[str]:
    """Every mssante service uses the postgres service, asyncpg, the same URL."""
    compose, problems = resolved(files)
    svcs = services(compose)
    urls = set()
    for name, svc in mssante_services(compose).items():
        try:
            url = make_url(service_settings(files, svc).store.url())
        except SettingsError as exc:
            problems.append(f"{name}: {exc}")
            continue
        urls.add(url.render_as_string(hide_password=False))
        if url.drivername != "postgresql+asyncpg":
            problems.append(f"{name}: store.database_url uses {url.drivername}")
            continue
        db = svcs.get(url.host or "")
        if db is None or not str(db.get("image", "")).startswith("postgres:"):
            problems.append(f"{name}: store.database_url host {url.host} is no postgres service")
            continue
        env = environment(db)
        for part, var in (
            ("username", "POSTGRES_USER"),
            ("password", "POSTGRES_PASSWORD"),
            ("database", "POSTGRES_DB"),
        ):
            if getattr(url, part) != env.get(var):
                problems.append(f"{name}: store.database_url {part} is not {var} of {url.host}")
        if url.port not in {None, 5432}:
            problems.append(f"{name}: store.database_url port {url.port}")
    if len(urls) > 1:
        problems.append("the mssante services use different databases")
    return problems


def check_mail_catcher(files: Files) -> list[str]:
    """Notification e-mails (and activation codes) reach Mailpit's SMTP port."""
    compose, problems = resolved(files)
    svcs = services(compose)
    found, more = serve_services(files)
    for name, (role, s) in found.items():
        if role not in {"worker", "web", "all"}:
            continue
        n = s.notify
        catcher = svcs.get(n.smarthost_host, {})
        if n.transport != "smarthost":
            problems.append(f"{name}: notify.transport is {n.transport!r}, not smarthost")
        elif "mailpit" not in str(catcher.get("image", "")):
            problems.append(f"{name}: notify.smarthost_host {n.smarthost_host} is not Mailpit")
        elif (n.smarthost_port, n.smarthost_starttls) != (1025, False):
            # Mailpit: plain SMTP on 1025 unless given a certificate.
            problems.append(f"{name}: Mailpit listens on 1025 without STARTTLS")
    return [*problems, *more]


CHECKS: dict[str, Check] = {
    check.__name__.removeprefix("check_"): check
    for check in (
        check_services,
        check_images,
        check_commands,
        check_environment,
        check_settings,
        check_listen_hosts,
        check_healthcheck,
        check_dockerfile,
        check_dockerignore,
        check_package_data,
        check_ports,
        check_volumes,
        check_stop_grace,
        check_depends_on,
        check_restart,
        check_secrets,
        check_database,
        check_mail_catcher,
    )
}


# --- the tests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files() -> Files:
    return load_files()


@pytest.mark.parametrize("name", CHECKS)
def test_container_files(files: Files, name: str) -> None:
    problems = CHECKS[name](files)
    assert problems == [], "\n".join(problems)


def test_compose_names_only_existing_variables(files: Files) -> None:
    """Interpolation with docker/.env filled as env.example says leaves nothing unset."""
    assert resolved(files)[1] == []


# Negative tests: each breaks one thing in a copy and expects its check to say so.


def _compose(files: Files, edit: Callable[[dict[str, Any]], None]) -> Files:
    compose = copy.deepcopy(files.compose)
    edit(compose)
    return dataclasses.replace(files, compose=compose)


def _dockerfile(files: Files, old: str, new: str) -> Files:
    assert old in files.dockerfile, old
    return dataclasses.replace(files, dockerfile=files.dockerfile.replace(old, new))


def _svc(compose: dict[str, Any], name: str) -> dict[str, Any]:
    svc: dict[str, Any] = compose["services"][name]
    return svc


def _set_env(name: str, var: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(compose: dict[str, Any]) -> None:
        _svc(compose, name)["environment"][var] = value

    return edit


def _set(name: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(compose: dict[str, Any]) -> None:
        if value is None:
            del _svc(compose, name)[key]
        else:
            _svc(compose, name)[key] = value

    return edit


def _drop_volume(name: str, target: str) -> Callable[[dict[str, Any]], None]:
    def edit(compose: dict[str, Any]) -> None:
        svc = _svc(compose, name)
        svc["volumes"] = [v for v in svc["volumes"] if target not in str(v)]

    return edit


def _drop_dep(name: str, dep: str) -> Callable[[dict[str, Any]], None]:
    def edit(compose: dict[str, Any]) -> None:
        del _svc(compose, name)["depends_on"][dep]

    return edit


COMPOSE_BREAKS: list[tuple[str, Check, Callable[[dict[str, Any]], None], str]] = [
    ("no mail catcher", check_services, lambda c: c["services"].pop("mailpit"), "mailpit missing"),
    (
        "unknown option",
        check_commands,
        _set("gateway", "command", ["serve", "--rol", "gateway"]),
        "No such option",
    ),
    (
        "unknown role",
        check_commands,
        _set("worker", "command", ["serve", "--role", "cron"]),
        "cron",
    ),
    (
        "unknown command",
        check_commands,
        _set("migrate", "command", ["db", "migrate"]),
        "No such command",
    ),
    (
        "wrong role",
        check_commands,
        _set("web", "command", ["serve", "--role", "gateway"]),
        "not mssante serve --role web",
    ),
    ("group alone", check_commands, _set("migrate", "command", ["db"]), "needs a command"),
    (
        "other entrypoint",
        check_commands,
        _set("web", "entrypoint", ["python"]),
        "not the mssante command",
    ),
    (
        "unknown key",
        check_environment,
        _set_env("web", "MSSANTE_WEB__PORTS", "8080"),
        "no key 'ports'",
    ),
    (
        "unknown section",
        check_environment,
        _set_env("web", "MSSANTE_HTTP__PORT", "8080"),
        "no settings section",
    ),
    (
        "single underscore",
        check_environment,
        _set_env("web", "MSSANTE_WEB_PORT", "8080"),
        "is ignored",
    ),
    (
        "YAML boolean",
        check_environment,
        _set_env("worker", "MSSANTE_NOTIFY__SMARTHOST_STARTTLS", False),
        "quoted string",
    ),
    (
        "invalid value",
        check_settings,
        _set_env("worker", "MSSANTE_NOTIFY__SMARTHOST_PORT", "smtp"),
        "notify.smarthost_port",
    ),
    (
        "loopback inside",
        check_listen_hosts,
        _set_env("gateway", "MSSANTE_SMTP__HOST", "127.0.0.1"),
        "smtp.host",
    ),
    (
        "ops port moved",
        check_healthcheck,
        _set_env("web", "MSSANTE_OPS__PORT", "9100"),
        "not ops.port 9100",
    ),
    (
        "probe disabled",
        check_healthcheck,
        _set("gateway", "healthcheck", {"disable": True}),
        "disabled",
    ),
    (
        "probe with curl",
        check_healthcheck,
        _set(
            "web", "healthcheck", {"test": ["CMD", "curl", "-f", "http://127.0.0.1:9025/healthz"]}
        ),
        "no curl",
    ),
    ("all interfaces", check_ports, _set("gateway", "ports", ["2525:2525"]), "published on all"),
    (
        "public address",
        check_ports,
        _set("web", "ports", ["0.0.0.0:8080:8080"]),
        "published on 0.0.0.0",
    ),
    (
        "long syntax",
        check_ports,
        _set("web", "ports", [{"target": 8080, "published": "8080"}]),
        "published on all",
    ),
    ("random host port", check_ports, _set("web", "ports", ["8080"]), "random host port"),
    (
        "long syntax, random port",
        check_ports,
        _set("web", "ports", [{"target": 8080, "host_ip": "127.0.0.1"}]),
        "random host port",
    ),
    (
        "port of another role",
        check_ports,
        _set("gateway", "ports", ["127.0.0.1:8080:8080"]),
        "role gateway does not serve",
    ),
    ("UI not published", check_ports, _set("mailpit", "ports", None), "8025"),
    (
        "no data volume",
        check_volumes,
        _drop_volume("worker", "/var/lib/mssante"),
        "worker: no named volume",
    ),
    (
        "other data dir",
        check_volumes,
        _set_env("web", "MSSANTE_STORE__DATA_DIR", "/data"),
        "web: no named volume at store.data_dir /data",
    ),
    (
        "other volume",
        check_volumes,
        _set(
            "web",
            "volumes",
            [
                "other:/var/lib/mssante",
                "./mssante.toml:/etc/mssante/mssante.toml:ro",
                "./secrets/keys:/etc/mssante/keys:ro",
            ],
        ),
        "different data volumes",
    ),
    ("no keys", check_volumes, _drop_volume("gateway", "keys"), "store.keys_dir"),
    (
        "keys in the data",
        check_volumes,
        _set_env("gateway", "MSSANTE_STORE__KEYS_DIR", "/var/lib/mssante/keys"),
        "inside the data volume",
    ),
    (
        "config writable",
        check_volumes,
        _set(
            "web",
            "volumes",
            [
                "mssante-data:/var/lib/mssante",
                "./mssante.toml:/etc/mssante/mssante.toml",
                "./secrets/keys:/etc/mssante/keys:ro",
            ],
        ),
        "mounted writable",
    ),
    (
        "grace too short",
        check_stop_grace,
        _set("gateway", "stop_grace_period", "30s"),
        "not longer than",
    ),
    (
        "grace default",
        check_stop_grace,
        _set("worker", "stop_grace_period", None),
        "default is 10 s",
    ),
    (
        "grace longer setting",
        check_stop_grace,
        _set_env("gateway", "MSSANTE_SMTP__SHUTDOWN_GRACE", "60"),
        "not longer than",
    ),
    ("no migrate first", check_depends_on, _drop_dep("gateway", "migrate"), "after migrate"),
    (
        "no postgres wait",
        check_depends_on,
        _drop_dep("migrate", "postgres"),
        "postgres to be healthy",
    ),
    (
        "healthy one-shot",
        check_depends_on,
        lambda c: _svc(c, "web")["depends_on"].update(migrate={"condition": "service_healthy"}),
        "no health check",
    ),
    (
        "missing dependency",
        check_depends_on,
        lambda c: _svc(c, "web")["depends_on"].update(redis={"condition": "service_started"}),
        "does not exist",
    ),
    ("unquoted no", check_restart, _set("migrate", "restart", False), "quote it"),
    ("no restart", check_restart, _set("gateway", "restart", None), "comes back"),
    ("one-shot restarts", check_restart, _set("migrate", "restart", "on-failure"), "one-shot"),
    (
        "password written",
        check_secrets,
        _set_env("postgres", "POSTGRES_PASSWORD", "hunter2"),
        "written in the compose file",
    ),
    (
        "password default",
        check_secrets,
        _set_env("postgres", "POSTGRES_PASSWORD", "${POSTGRES_PASSWORD:-hunter2}"),
        "has a default",
    ),
    (
        "password in URL",
        check_secrets,
        _set_env(
            "gateway",
            "MSSANTE_STORE__DATABASE_URL",
            "postgresql+asyncpg://mssante:hunter2@postgres/mssante",
        ),
        "holds a password",
    ),
    (
        "undocumented variable",
        check_secrets,
        _set_env("web", "MSSANTE_LOG__LEVEL", "${LOG_LEVEL:-INFO}"),
        "LOG_LEVEL",
    ),
    (
        "SQLite",
        check_database,
        _set_env("web", "MSSANTE_STORE__DATABASE_URL", "sqlite+aiosqlite:////var/lib/mssante/x.db"),
        "sqlite+aiosqlite",
    ),
    (
        "other host",
        check_database,
        _set_env(
            "web",
            "MSSANTE_STORE__DATABASE_URL",
            "postgresql+asyncpg://mssante:${POSTGRES_PASSWORD:?}@db/mssante",
        ),
        "no postgres service",
    ),
    (
        "other user",
        check_database,
        _set_env(
            "web",
            "MSSANTE_STORE__DATABASE_URL",
            "postgresql+asyncpg://admin:${POSTGRES_PASSWORD:?}@postgres/mssante",
        ),
        "username",
    ),
    (
        "files not mailpit",
        check_mail_catcher,
        _set_env("worker", "MSSANTE_NOTIFY__TRANSPORT", "file"),
        "not smarthost",
    ),
    (
        "STARTTLS to mailpit",
        check_mail_catcher,
        _set_env("web", "MSSANTE_NOTIFY__SMARTHOST_STARTTLS", "true"),
        "without STARTTLS",
    ),
    ("unpinned image", check_images, _set("mailpit", "image", "axllent/mailpit"), "not pinned"),
    (
        "other Dockerfile",
        check_images,
        _set("web", "build", {"context": "..", "dockerfile": "Dockerfile"}),
        "not docker/Dockerfile",
    ),
]


@pytest.mark.parametrize(
    ("check", "edit", "expected"),
    [pytest.param(c, e, x, id=i) for i, c, e, x in COMPOSE_BREAKS],
)
def test_check_finds_broken_compose(
    files: Files, check: Check, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    problems = check(_compose(files, edit))
    assert any(expected in p for p in problems), problems


DOCKERFILE_BREAKS: list[tuple[str, Check, str, str, str]] = [
    ("one stage", check_dockerfile, "FROM python:3.12-slim-bookworm AS build\n", "", "one stage"),
    (
        "nothing built",
        check_dockerfile,
        "COPY --from=build",
        "COPY --from=python:3.12",
        "copies nothing",
    ),
    (
        "unpinned base",
        check_dockerfile,
        "FROM python:3.12-slim-bookworm AS runtime",
        "FROM python AS runtime",
        "not pinned",
    ),
    ("root", check_dockerfile, "USER 10001:10001", "USER root", "runs as root"),
    ("no user", check_dockerfile, "USER 10001:10001", "", "runs as root"),
    ("user by name", check_dockerfile, "USER 10001:10001", "USER mssante", "numeric uid"),
    (
        "data dir not owned",
        check_dockerfile,
        "install -d -o 10001 -g 10001 -m 0750 /var/lib/mssante",
        "true",
        "not created owned",
    ),
    (
        "port not exposed",
        check_dockerfile,
        "EXPOSE 2525 2587 8080 8443 9025",
        "EXPOSE 2525",
        "port 8080 not EXPOSEd",
    ),
    (
        "shell entrypoint",
        check_dockerfile,
        'ENTRYPOINT ["mssante"]',
        "ENTRYPOINT mssante",
        "ENTRYPOINT",
    ),
    ("whole context", check_dockerfile, "COPY mssante/ mssante/", "COPY . .", "whole context"),
    (
        "bad CMD",
        check_commands,
        'CMD ["serve", "--role", "all"]',
        'CMD ["serve", "--roles", "all"]',
        "ENTRYPOINT/CMD",
    ),
    (
        "bad RUN",
        check_commands,
        "mssante config check /etc/mssante/mssante.toml",
        "mssante config verify /etc/mssante/mssante.toml",
        "Dockerfile RUN",
    ),
    (
        "missing file",
        check_commands,
        "mssante config check /etc/mssante/mssante.toml",
        "mssante config check /etc/mssante/other.toml",
        "does not exist",
    ),
    ("no probe", check_healthcheck, "HEALTHCHECK", "# HEALTHCHECK", "no HEALTHCHECK"),
    (
        "probe port",
        check_healthcheck,
        "127.0.0.1:9025/healthz",
        "127.0.0.1:9026/healthz",
        "probe port 9026",
    ),
    (
        "probe path",
        check_healthcheck,
        "127.0.0.1:9025/healthz",
        "127.0.0.1:9025/health",
        "probe path '/health'",
    ),
    (
        "probe curl",
        check_healthcheck,
        '["/opt/mssante/bin/python", "-c",',
        '["curl", "-f",',
        "no curl",
    ),
    (
        "copy ignored",
        check_dockerignore,
        "COPY pyproject.toml README.md ./",
        "COPY pyproject.toml README.md HACKING.md ./",
        "leaves out",
    ),
    (
        "config elsewhere",
        check_settings,
        "MSSANTE_CONFIG=/etc/mssante/mssante.toml",
        "MSSANTE_CONFIG=/etc/mssante.toml",
        "no file is copied",
    ),
]


@pytest.mark.parametrize(
    ("check", "old", "new", "expected"),
    [pytest.param(c, o, n, x, id=i) for i, c, o, n, x in DOCKERFILE_BREAKS],
)
def test_check_finds_broken_dockerfile(
    files: Files, check: Check, old: str, new: str, expected: str
) -> None:
    problems = check(_dockerfile(files, old, new))
    assert any(expected in p for p in problems), problems


def test_check_finds_tests_in_build_context(files: Files) -> None:
    broken = dataclasses.replace(files, dockerignore=files.dockerignore.replace("*\n", "", 1))
    problems = check_dockerignore(broken)
    assert any("tests/test_containers.py" in p for p in problems), problems
    assert ignored("*\n!mssante/\n**/__pycache__\n", "mssante/web/__pycache__/x.pyc")
    assert not ignored("*\n!mssante/\n", "mssante/web/app.py")


def test_check_finds_file_left_out_of_wheel(files: Files) -> None:
    broken = dataclasses.replace(files, pyproject=files.pyproject.replace("script.py.mako", "x"))
    problems = check_package_data(broken)
    assert "mssante/store/migrations/script.py.mako" in " ".join(problems), problems


def test_check_finds_invalid_container_config(files: Files, tmp_path: Path) -> None:
    bad = tmp_path / "mssante.toml"
    bad.write_text((DOCKER / "mssante.toml").read_text() + "\n[smtp2]\nport = 25\n")

    def edit(compose: dict[str, Any]) -> None:
        volumes = _svc(compose, "gateway")["volumes"]
        volumes[1] = f"{bad}:/etc/mssante/mssante.toml:ro"

    problems = check_settings(_compose(files, edit))
    assert any(p.startswith("gateway:") and "smtp2" in p for p in problems), problems


def test_check_finds_secret_default(files: Files) -> None:
    def edit(compose: dict[str, Any]) -> None:
        compose.update(json.loads(json.dumps(compose).replace(":?", ":-")))

    problems = check_secrets(_compose(files, edit))
    assert any("starts without docker/.env" in p for p in problems), problems
    filled = dataclasses.replace(files, env_example="POSTGRES_PASSWORD=hunter2\n")
    assert any("must stay empty" in p for p in check_secrets(filled))


def test_cli_problems_parses_like_the_entry_point() -> None:
    assert cli_problems(["mssante", "db", "upgrade"]) == []
    assert cli_problems(["mssante", "--help"]) == []
    assert cli_problems(["mssante", "db", "upgrade", "now"])  # extra argument
    assert cli_problems(["mssante", "config", "check"])  # missing FILE
    assert cli_problems(["mssante", "patients", "show", "123"])  # not an INS
    assert cli_problems(["/opt/mssante/bin/mssante", "queue", "list"]) == []


def test_helpers() -> None:
    assert seconds("1m30s") == 90 and seconds("40s") == 40 and seconds("40") is None
    assert ports({"ports": ["127.0.0.1:25:2525/tcp"]}) == [Port("127.0.0.1", "25", 2525)]
    assert ports({"ports": ["[::1]:8080:8080"]}) == [Port("::1", "8080", 8080)]
    assert shell_commands("a && b c > /dev/null 2> x; mssante --help | cat") == [
        ["a"],
        ["b", "c"],
        ["mssante", "--help"],
        ["cat"],
    ]
    problems: list[str] = []
    assert interpolate("$${A} ${A:-x} ${B:-y} ${C:?no}", {"A": "1"}, problems) == "${A} 1 y "
    assert problems == ["${C} is required and unset: no"]
