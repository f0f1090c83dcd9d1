"""``brickyard users``: manage the gateway's users and API keys through its admin API.

Prints the API's JSON answer on stdout; on a refusal prints the API's message on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from urllib.parse import quote

import orjson

from brickyard_core.defaults import ADMIN_PORT, LOOPBACK

DEFAULT_URL = f"http://{LOOPBACK}:{ADMIN_PORT}"


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _limit(text: str) -> int | None:
    """A limit for ``update``: a count, or ``default`` (null: back to the deployment's default)."""
    return None if text == "default" else _count(text)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``users`` and its actions to the ``brickyard`` subcommands."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--url",
        default=os.environ.get("BRICKYARD_ADMIN_URL", DEFAULT_URL),
        help=f"admin API base URL (default: $BRICKYARD_ADMIN_URL, else {DEFAULT_URL})",
    )
    connection.add_argument(
        "--token",
        default=os.environ.get("BRICKYARD_ADMIN_TOKEN"),
        help="admin token (default: $BRICKYARD_ADMIN_TOKEN)",
    )
    help_ = "Manage the gateway's users and API keys through its admin API."
    users = commands.add_parser("users", help=help_, description=help_)
    users.set_defaults(run=main)
    actions = users.add_subparsers(dest="action", required=True)

    def action(name: str, help_: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[connection], help=help_, description=help_)
        if name != "list":
            sub.add_argument("name", help="user name")
        return sub

    create = action("create", "Create a user.")
    create.add_argument("--rpm", type=_count, help="requests per minute (default: the deployment's)")
    create.add_argument("--tpm", type=_count, help="tokens per minute (default: the deployment's)")
    action("get", "Show a user.")
    update = action("update", "Change a user's limits.")
    for limit in ("rpm", "tpm"):
        update.add_argument(
            f"--{limit}",
            type=_limit,
            default=argparse.SUPPRESS,
            metavar="N|default",
            help=f"new {limit}; 'default' for the deployment's",
        )
    action("delete", "Delete a user and its API keys.")
    action("list", "List the users.")
    action("create-key", "Create an API key for a user; the key is shown only this once.")
    revoke = action("revoke-key", "Revoke one of a user's API keys.")
    revoke.add_argument("key_id", help="the key's id (12 hex characters, as listed)")


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, object] | None]:
    """The method, path and JSON body of the action."""
    if args.action == "list":
        return "GET", "/admin/users", None
    path = f"/admin/users/{quote(args.name, safe='')}"
    if args.action == "create":
        limits = {k: getattr(args, k) for k in ("rpm", "tpm") if getattr(args, k) is not None}
        return "POST", "/admin/users", {"name": args.name, **limits}
    if args.action == "update":
        return "PATCH", path, {k: getattr(args, k) for k in ("rpm", "tpm") if hasattr(args, k)}
    if args.action == "delete":
        return "DELETE", path, None
    if args.action == "create-key":
        return "POST", f"{path}/keys", None
    if args.action == "revoke-key":
        return "DELETE", f"{path}/keys/{quote(args.key_id, safe='')}", None
    return "GET", path, None


def main(args: argparse.Namespace) -> None:
    import httpx  # only this command needs it: imported here, not by every ``brickyard`` command

    if not args.token:
        sys.exit("brickyard users: no admin token: pass --token or set BRICKYARD_ADMIN_TOKEN")
    method, path, body = _request(args)
    try:
        response = httpx.request(
            method,
            args.url.rstrip("/") + path,
            content=None if body is None else orjson.dumps(body),
            headers={"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"},
            timeout=10,
        )
    except httpx.HTTPError as exc:
        sys.exit(f"brickyard users: cannot reach the admin API at {args.url}: {exc}")
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code}: {response.text.strip()}"
        sys.exit(f"brickyard users: {message}")
    if response.content:
        print(orjson.dumps(response.json(), option=orjson.OPT_INDENT_2).decode())
