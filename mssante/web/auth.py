"""Activation, login, second factor, account page, closing and logout (issue 8.2, 8.3, 8.9).

Activation (a profile in status *created*):
1. INS, birth date and the provisional code (``mssante patients issue-code``);
2. a personal e-mail address, to which a one-time code is sent;
3. that code and a new password: the profile is activated and the patient
   is logged in.
Steps 2 and 3 run in a server session that knows only the patient being
activated (``state["activation"]``); it is replaced by a new session at
login (rotation).

Login: INS or e-mail address and password, then the TOTP code when the
second factor is on.  Failures count per identifier and per client address
(store/credentials.py); the answer is the same whether the identifier
exists or not, locked or not, so the form tells nothing about who has an
account.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

from email_validator import EmailNotValidError, validate_email
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mssante.routing.ins import InsError, parse_ins
from mssante.store import credentials
from mssante.store.models import Patient
from mssante.web import activation, pages, sessions
from mssante.web.context import Web, web
from mssante.web.forms import Errors, read_form, text
from mssante.web.views import french_datetime, logged_in, page, record, redirect

LOGIN_FAILED = "Identifiant ou mot de passe incorrect."
ACTIVATION_FAILED = (
    "Ces informations ne permettent pas d'activer une messagerie. Vérifiez le numéro, la date"
    " de naissance et le code provisoire reçu par courrier ou par e-mail."
)
LOCKED = (
    "Trop de tentatives. Par sécurité, réessayez après {until}. Si vous avez oublié votre mot de"
    " passe, contactez votre caisse d'assurance maladie."
)
# E-mail confirmation codes sent per activation session.
_EMAIL_SENDS = 3
# Activation steps 2-3 must be finished within this time.
_ACTIVATION_SESSION = 1800.0


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _keys(w: Web, request: Request, identifier: str) -> list[str]:
    return credentials.throttle_keys(w.pseudonym, identifier, _client(request))


async def _locked(w: Web, keys: list[str]) -> str | None:
    until = await credentials.throttle_status(w.store, keys, at=w.clock.now())
    return LOCKED.format(until=french_datetime(until)) if until is not None else None


# --- login ----------------------------------------------------------------------------


async def login(request: Request) -> Response:
    w = web(request)
    current = await sessions.load(request)
    if request.method == "GET":
        pending = current is not None and current.state.get("pending_totp")
        if current is not None and current.patient_id is not None and not pending:
            return redirect("/messages")
        info = "Vous êtes déconnecté." if request.query_params.get("info") == "logout" else None
        return await page(
            request, "login.html", {"title": "Connexion", "errors": Errors(), "info": info}
        )
    # The token the form was shown with: the session's whenever there is one (views.page).
    form = await read_form(request, current)
    identifier = text(form, "identifiant", limit=320)
    password = text(form, "mot_de_passe", limit=1000)
    errors = Errors()
    keys = _keys(w, request, identifier)
    if locked := await _locked(w, keys):
        errors.general = locked
    elif not identifier or not password:
        errors.general = LOGIN_FAILED
    else:
        result = await credentials.verify_login(w.store, identifier, password, at=w.clock.now())
        if result.patient_id is not None and result.ok:
            await credentials.clear(w.store, keys[0], at=w.clock.now())
            if await credentials.totp_required(w.store, result.patient_id):
                # Half logged in: only the code page is open to this session.
                response = redirect("/connexion/code")
                await sessions.start(
                    w,
                    response,
                    patient_id=result.patient_id,
                    state={"pending_totp": True},
                    replacing=current,
                    lifetime=300,
                )
                return response
            return await _logged_in(w, request, result.patient_id, current)
        await credentials.record_failure(w.store, keys, at=w.clock.now())
        if result.patient_id is not None:
            await record(w, "web.login_failed", result.patient_id)
        errors.general = LOGIN_FAILED
    return await page(
        request,
        "login.html",
        {"title": "Connexion", "errors": errors, "identifier": identifier},
        400,
    )


async def _logged_in(
    w: Web, request: Request, patient_id: int, current: sessions.Session | None
) -> Response:
    response = redirect("/messages")
    await sessions.start(w, response, patient_id=patient_id, replacing=current)
    await record(w, "web.login", patient_id)
    return response


async def login_code(request: Request) -> Response:
    w = web(request)
    current = await sessions.load(request)
    if current is None or current.patient_id is None or not current.state.get("pending_totp"):
        return redirect("/connexion")
    errors = Errors()
    if request.method == "POST":
        form = await read_form(request, current)
        code = text(form, "code", limit=20).replace(" ", "")
        keys = _keys(w, request, f"totp:{current.patient_id}")
        if locked := await _locked(w, keys):
            errors.general = locked
        elif await credentials.check_totp(w.store, current.patient_id, code, at=w.clock.now()):
            return await _logged_in(w, request, current.patient_id, current)
        else:
            await credentials.record_failure(w.store, keys, at=w.clock.now())
            await record(w, "web.login_failed", current.patient_id, factor="totp")
            errors.add("code", "Code incorrect ou expiré.")
    return await page(
        request,
        "login_code.html",
        {"title": "Code de sécurité", "errors": errors},
        400 if errors else 200,
    )


async def logout(request: Request) -> Response:
    w = web(request)
    session = await sessions.load(request)
    if session is not None:
        await read_form(request, session)
        await sessions.end(w, session.id)
        if session.patient_id is not None:
            await record(w, "web.logout", session.patient_id)
    response = redirect("/connexion?info=logout")
    sessions.forget(w, response)
    return response


# --- activation -----------------------------------------------------------------------


def _birth_date(form_day: str, form_month: str, form_year: str) -> date | None:
    try:
        return date(int(form_year), int(form_month), int(form_day))
    except ValueError:
        return None


async def activate_start(request: Request) -> Response:
    w = web(request)
    current = await sessions.load(request)
    errors = Errors()
    values = {"ins": "", "jour": "", "mois": "", "annee": ""}
    if request.method == "POST":
        form = await read_form(request, current)
        values = {k: text(form, k, limit=40) for k in values}
        code = text(form, "code", limit=40)
        parsed = parse_ins("".join(values["ins"].split()).upper())
        ins: str | None = None
        if isinstance(parsed, InsError):
            errors.add("ins", "Le numéro doit comporter 15 caractères (chiffres, ou 2A/2B).")
        else:
            ins = parsed.value
        born = _birth_date(values["jour"], values["mois"], values["annee"])
        if born is None:
            errors.add("jour", "Indiquez une date de naissance valide (jour, mois, année).")
        if not code:
            errors.add("code", "Indiquez le code provisoire reçu.")
        if not errors and ins is not None and born is not None:
            keys = _keys(w, request, ins)
            if locked := await _locked(w, keys):
                errors.general = locked
            else:
                result = await credentials.check_activation(
                    w.store, ins=ins, birth_date=born, code=code, at=w.clock.now()
                )
                if result.ok and result.patient_id is not None:
                    response = redirect("/activation/adresse")
                    await sessions.start(
                        w,
                        response,
                        patient_id=None,
                        state={"activation": result.patient_id},
                        replacing=current,
                        lifetime=_ACTIVATION_SESSION,
                    )
                    return response
                await credentials.record_failure(w.store, keys, at=w.clock.now())
                errors.general = ACTIVATION_FAILED
    return await page(
        request,
        "activation.html",
        {"title": "Activer ma messagerie", "errors": errors, "values": values},
        400 if errors else 200,
    )


async def _activation_session(request: Request) -> tuple[Web, sessions.Session, int]:
    session = await sessions.load(request)
    if session is None or not isinstance(session.state.get("activation"), int):
        raise HTTPException(303, headers={"location": "/activation"})
    return web(request), session, int(session.state["activation"])


async def activate_address(request: Request) -> Response:
    w, session, _patient_id = await _activation_session(request)
    errors = Errors()
    email = str(session.state.get("email", ""))
    if request.method == "POST":
        form = await read_form(request, session)
        email = text(form, "email", limit=320)
        try:
            email = validate_email(email, check_deliverability=False).normalized
        except EmailNotValidError:
            errors.add("email", "Indiquez une adresse e-mail valide, par exemple nom@exemple.fr.")
        sent = int(session.state.get("email_sends", 0))
        if not errors and sent >= _EMAIL_SENDS:
            # Each code gets 5 tries: a few codes per activation, not a guessing oracle
            # nor a way to send mail to any address.
            errors.add(
                "email",
                "Trop de codes envoyés. Recommencez l'activation depuis le début dans 30 minutes.",
            )
        if not errors:
            code, digest = credentials.new_email_code()
            expires = w.clock.now() + timedelta(minutes=w.settings.web.email_code_minutes)
            session.state.update(
                email=email,
                email_code=digest,
                email_expires=expires.isoformat(),
                email_tries=0,
                email_sends=sent + 1,
            )
            await sessions.save_state(w, session)
            await activation.send_email_confirmation(
                w.store, w.settings, w.clock, email, code, transport=w.transport
            )
            return redirect("/activation/confirmation")
    return await page(
        request,
        "activation_address.html",
        {"title": "Votre adresse e-mail", "errors": errors, "email": email},
        400 if errors else 200,
    )


async def activate_confirm(request: Request) -> Response:
    w, session, patient_id = await _activation_session(request)
    if "email_code" not in session.state:
        return redirect("/activation/adresse")
    errors = Errors()
    if request.method == "POST":
        form = await read_form(request, session)
        code = text(form, "code", limit=20).replace(" ", "")
        password = text(form, "mot_de_passe", limit=1000)
        confirm = text(form, "confirmation", limit=1000)
        expired = w.clock.now() >= datetime.fromisoformat(str(session.state["email_expires"]))
        tries = int(session.state.get("email_tries", 0))
        if expired or tries >= 5:
            errors.add("code", "Ce code a expiré : demandez-en un nouveau.")
        elif not credentials.email_code_matches(str(session.state["email_code"]), code):
            session.state["email_tries"] = tries + 1
            await sessions.save_state(w, session)
            errors.add("code", "Code incorrect. Vérifiez le code reçu par e-mail.")
        async with w.store.reads() as db:
            patient = await db.get(Patient, patient_id)
        if patient is None:
            raise HTTPException(303, headers={"location": "/activation"})
        for problem in credentials.password_problems(
            password, ins=patient.ins, birth_date=patient.birth_date
        ):
            errors.add("mot_de_passe", problem)
        if password != confirm:
            errors.add("confirmation", "Les deux mots de passe ne sont pas identiques.")
        if not errors:
            done = await credentials.activate(
                w.store,
                patient_id,
                password=password,
                email=str(session.state["email"]),
                at=w.clock.now(),
            )
            if not done:
                errors.general = ACTIVATION_FAILED
            else:
                response = redirect("/messages?info=activated")
                await sessions.start(w, response, patient_id=patient_id, replacing=session)
                await record(w, "web.login", patient_id)
                return response
    return await page(
        request,
        "activation_confirm.html",
        {
            "title": "Confirmer et choisir un mot de passe",
            "errors": errors,
            "email": session.state.get("email"),
        },
        400 if errors else 200,
    )


# --- account --------------------------------------------------------------------------


async def account(request: Request) -> Response:
    w = web(request)
    session = await logged_in(request)
    assert session.patient_id is not None
    async with w.store.reads() as db:
        patient = await db.get(Patient, session.patient_id)
    totp = await credentials.totp_required(w.store, session.patient_id)
    return await page(
        request,
        "account.html",
        {
            "title": "Mon compte",
            "nav": "compte",
            "patient": patient,
            "totp": totp,
            # Where /compte/double-authentification sends back (?info=totp, totp_off).
            "info": pages.info(request),
        },
    )


async def totp_setup(request: Request) -> Response:
    w = web(request)
    session = await logged_in(request)
    assert session.patient_id is not None
    errors = Errors()
    if request.method == "POST":
        form = await read_form(request, session)
        if text(form, "action") == "desactiver":
            await credentials.disable_totp(w.store, session.patient_id, at=w.clock.now())
            return redirect("/compte?info=totp_off")
        secret = str(session.state.get("totp_secret", ""))
        code = text(form, "code", limit=20).replace(" ", "")
        if secret and await credentials.enable_totp(
            w.store, session.patient_id, secret, code, at=w.clock.now()
        ):
            session.state.pop("totp_secret", None)
            await sessions.save_state(w, session)
            return redirect("/compte?info=totp")
        errors.add(
            "code", "Code incorrect. Saisissez le code à 6 chiffres affiché par l'application."
        )
    if "totp_secret" not in session.state:
        session.state["totp_secret"] = credentials.new_totp_secret()
        await sessions.save_state(w, session)
    secret = str(session.state["totp_secret"])
    grouped = " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))
    return await page(
        request,
        "totp.html",
        {"title": "Double authentification", "nav": "compte", "secret": grouped, "errors": errors},
        400 if errors else 200,
    )


async def close(request: Request) -> Response:
    w = web(request)
    session = await logged_in(request)
    assert session.patient_id is not None
    errors = Errors()
    if request.method == "POST":
        form = await read_form(request, session)
        if text(form, "confirmation") != "oui":
            errors.add(
                "confirmation", "Cochez la case pour confirmer la fermeture de votre messagerie."
            )
        else:
            await credentials.close_mailbox(
                w.store, session.patient_id, at=w.clock.now(), actor="web"
            )
            response = await page(
                request,
                "closed.html",
                {"title": "Messagerie fermée", "profiles": [], "viewer": None},
                with_session=False,
            )
            sessions.forget(w, response)
            return response
    return await page(
        request,
        "close.html",
        {"title": "Fermer ma messagerie", "nav": "compte", "errors": errors},
        400 if errors else 200,
    )


routes = [
    Route("/connexion", login, methods=["GET", "POST"]),
    Route("/connexion/code", login_code, methods=["GET", "POST"]),
    Route("/deconnexion", logout, methods=["POST"]),
    Route("/activation", activate_start, methods=["GET", "POST"]),
    Route("/activation/adresse", activate_address, methods=["GET", "POST"]),
    Route("/activation/confirmation", activate_confirm, methods=["GET", "POST"]),
    Route("/compte", account),
    Route("/compte/double-authentification", totp_setup, methods=["GET", "POST"]),
    Route("/compte/fermer", close, methods=["GET", "POST"]),
]
