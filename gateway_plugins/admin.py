"""The admin API: users and their API keys over HTTP, for operators and ``brickyard users``.

Every route needs ``Authorization: Bearer <admin token>``, checked before routing so an unauthenticated
caller cannot even learn which paths exist. Every refusal has the OpenAI error shape of the gateway's
own (``GatewayError``): bad input is a 400 naming the offending ``param``, Redis down a 503, and an
unexpected failure a 500 whose traceback goes to the log, never to the caller.

Records are shown without their key digests: a key appears as its 12-character id, and in plaintext
only in the answer that created it.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from redis.exceptions import RedisError

from brickyard_core.credentials import bearer_matches, parse_bearer
from gateway_plugins.errors import GatewayError
from gateway_plugins.tenancy.users import (
    UNSET,
    InvalidUserError,
    KeyNotFound,
    User,
    UserExists,
    UserNotFound,
    UserStore,
    hash_key,
    key_id_of,
    validate_limit,
    validate_name,
)

log = logging.getLogger(__name__)

_STORE: web.AppKey[UserStore] = web.AppKey("store", UserStore)
_CREATE_FIELDS = frozenset({"name", "rpm", "tpm"})
_UPDATE_FIELDS = frozenset({"rpm", "tpm"})


def admin_app(store: UserStore, token: str) -> web.Application:
    if not token:
        raise ValueError("the admin API needs a non-empty token")
    app = web.Application(middlewares=[_errors, _require_token(token)])
    app[_STORE] = store
    app.add_routes(
        [
            web.get("/admin/users", _list_users),
            web.post("/admin/users", _create_user),
            web.get("/admin/users/{name}", _get_user),
            web.patch("/admin/users/{name}", _update_user),
            web.delete("/admin/users/{name}", _delete_user),
            web.post("/admin/users/{name}/keys", _create_key),
            web.delete("/admin/users/{name}/keys/{id}", _revoke_key),
        ]
    )
    return app


def _error(status: int, message: str, *, code: str, param: str | None = None) -> GatewayError:
    return GatewayError(status, message, cause="admin", code=code, param=param)


def _error_response(error: GatewayError) -> web.Response:
    return web.Response(status=error.status, body=error.body(), headers=error.response_headers())


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into an OpenAI-style error body."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return _error_response(exc)
    except (UserNotFound, KeyNotFound) as exc:
        code = "user_not_found" if isinstance(exc, UserNotFound) else "key_not_found"
        return _error_response(_error(404, str(exc), code=code))
    except UserExists as exc:
        return _error_response(_error(409, str(exc), code="user_exists", param="name"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _error(exc.status, exc.reason, code=exc.reason.lower().replace(" ", "_"))
        if "Allow" in exc.headers:
            error.headers["Allow"] = exc.headers["Allow"]
        return _error_response(error)
    except (RedisError, OSError) as exc:
        log.warning("admin API: Redis unavailable: %s", exc)
        message = f"The user store is unavailable: cannot reach Redis ({exc})."
        return _error_response(_error(503, message, code="store_unavailable"))
    except Exception:
        log.exception("admin API: %s %s failed", request.method, request.path)
        return _error_response(_error(500, "Internal error; see the gateway's log.", code="internal_error"))


def _require_token(token: str) -> Middleware:
    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        authorization = request.headers.get("Authorization")
        if parse_bearer(authorization) is None:
            raise _unauthorized("Missing admin token: send `Authorization: Bearer <admin token>`.")
        if not bearer_matches(authorization, token):
            raise _unauthorized("Incorrect admin token.")
        return await handler(request)

    return require_token


def _unauthorized(message: str) -> GatewayError:
    error = _error(401, message, code="invalid_admin_token")
    error.headers["WWW-Authenticate"] = "Bearer"
    return error


def _bad_request(message: str, *, code: str, param: str | None = None) -> GatewayError:
    return _error(400, message, code=code, param=param)


async def _body(request: web.Request, fields: frozenset[str]) -> dict[str, object]:
    """The request's JSON object, with no field outside ``fields``."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise _bad_request("The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad_request("The body must be a JSON object.", code="invalid_body")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise _bad_request(
            f"Unknown field {unknown[0]!r}; expected {', '.join(sorted(fields))}.",
            code="unknown_parameter",
            param=unknown[0],
        )
    return body


def _invalid(exc: InvalidUserError) -> GatewayError:
    return _bad_request(str(exc), code="invalid_value", param=exc.param)


def _record(user: User) -> dict[str, object]:
    return {
        "name": user.name,
        "rpm": user.rpm,
        "tpm": user.tpm,
        "created": user.created,
        "keys": [{"id": id_} for id_ in user.key_ids],
    }


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def _list_users(request: web.Request) -> web.Response:
    users = await request.app[_STORE].list()
    return _json({"object": "list", "data": [_record(user) for user in users]})


async def _create_user(request: web.Request) -> web.Response:
    body = await _body(request, _CREATE_FIELDS)
    if "name" not in body:
        raise _bad_request("name is required.", code="missing_required_parameter", param="name")
    try:
        user = User(
            name=validate_name(body["name"]),
            rpm=validate_limit("rpm", body.get("rpm")),
            tpm=validate_limit("tpm", body.get("tpm")),
        )
    except InvalidUserError as exc:
        raise _invalid(exc) from None
    return _json(_record(await request.app[_STORE].create(user)), status=201)


async def _get_user(request: web.Request) -> web.Response:
    return _json(_record(await request.app[_STORE].get(request.match_info["name"])))


async def _update_user(request: web.Request) -> web.Response:
    body = await _body(request, _UPDATE_FIELDS)
    if not body:
        raise _bad_request("Nothing to update: give rpm and/or tpm.", code="missing_required_parameter")
    try:
        rpm = validate_limit("rpm", body["rpm"]) if "rpm" in body else UNSET
        tpm = validate_limit("tpm", body["tpm"]) if "tpm" in body else UNSET
    except InvalidUserError as exc:
        raise _invalid(exc) from None
    user = await request.app[_STORE].update(request.match_info["name"], rpm=rpm, tpm=tpm)
    return _json(_record(user))


async def _delete_user(request: web.Request) -> web.Response:
    await request.app[_STORE].delete(request.match_info["name"])
    return web.Response(status=204)


async def _create_key(request: web.Request) -> web.Response:
    key = await request.app[_STORE].create_key(request.match_info["name"])
    return _json({"id": key_id_of(hash_key(key)), "key": key}, status=201)


async def _revoke_key(request: web.Request) -> web.Response:
    await request.app[_STORE].revoke_key(request.match_info["name"], request.match_info["id"])
    return web.Response(status=204)
