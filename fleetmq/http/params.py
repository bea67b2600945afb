"""Request pieces every route reads the same way: a node id in the path, a whole number in
the query, and the contract's JSON answers."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fleetmq.core.models import Rejection, quote
from fleetmq.core.topics import is_valid_node_id
from fleetmq.views import dumps

JSON = "application/json"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(body=dumps(body), status=status, content_type=JSON, headers=headers)


def error_response(status: int, title: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": title, "message": message}, status, headers)


def path_id(request: web.Request) -> str:
    """The path's ``{node_id}``, or 400 when it is not a valid node id (contract section 2)."""
    node_id = request.match_info["node_id"]
    if not is_valid_node_id(node_id):
        raise Rejection(400, "Invalid node id",
                        f"{quote(repr(node_id))} is not a valid node id: use 1 to 128 letters, "
                        "digits and '._:-', starting with a letter or digit", "invalid_id")
    return node_id


def whole(text: str | None, name: str, highest: int) -> int | None:
    """A query parameter that must be a whole number from 1 to ``highest``, if present."""
    if text is None:
        return None
    # ASCII digits only ("²".isdigit() is true, yet int() refuses it), and few enough of them
    # that int() never meets its 4300-digit limit: either would escape as a 500.
    digits = text.lstrip("0")
    if (not (text.isascii() and text.isdigit()) or len(digits) > len(str(highest))
            or not 1 <= int(digits or "0") <= highest):
        raise Rejection(400, "Invalid parameter",
                        f"Parameter '{name}' must be a whole number from 1 to {highest}, "
                        f"not {quote(repr(text))}", "invalid_query")
    return int(digits)
