"""Reading a POSTed form: size limits, the CSRF check, field errors tied to fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from mssante.web import sessions
from mssante.web.sessions import Session


async def read_form(request: Request, session: Session | None, *, files: int = 0) -> FormData:
    """The form, after the CSRF check (raises CsrfError, answered 403)."""
    settings = request.app.state.web.settings
    form = await request.form(max_files=files, max_fields=50, max_part_size=settings.web.max_upload)
    try:
        sessions.check_csrf(request, form, session)
    except sessions.CsrfError:
        await form.close()  # uploaded files of a refused POST: their temporary files
        raise
    return form


def text(form: FormData, name: str, *, limit: int = 1000) -> str:
    value = form.get(name)
    if not isinstance(value, str):
        return ""
    return value.strip()[:limit]


def uploads(form: FormData, name: str) -> list[UploadFile]:
    return [f for f in form.getlist(name) if isinstance(f, UploadFile) and f.filename]


@dataclass
class Errors:
    """Errors by field name, shown next to the field (aria-describedby) and in a summary."""

    fields: dict[str, str] = field(default_factory=dict)
    general: str | None = None

    def add(self, name: str, message: str) -> None:
        self.fields.setdefault(name, message)

    def __bool__(self) -> bool:
        return bool(self.fields) or self.general is not None
