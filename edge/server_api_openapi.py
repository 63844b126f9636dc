"""The OpenAPI 3.0 document of the server API, served at ``/v1/api/openapi.json``.

Kept beside ``edge.server_api`` and checked against a live edge by schemathesis
(tests/integration/test_server_api_schema.py): a route, a field or a status code that one
has and the other lacks fails that test.
"""

from __future__ import annotations

from typing import Any

from signalpost.api_keys import SCOPES

_ERROR_CODES = [
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "not_in_room",
    "unknown_peer",
    "room_full",
    "too_large",
    "rate_limited",
    "internal",
    "unavailable",
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "bad request (`bad_request`)",
        401: "no API key, or not a valid one (`unauthorized`)",
        403: "the key lacks the operation's scope (`forbidden`)",
        404: "no such room, session or user session (`not_found`, `unknown_peer`)",
        405: "method not allowed on this path (`bad_request`)",
        409: "the idempotency key was used for another request (`bad_request`)",
        413: "body or data too large (`too_large`)",
        429: "too many API requests waiting for owners (`rate_limited`)",
        503: "an owner did not answer within `api_timeout` (`unavailable`): retry",
    }
    return {str(s): _json(_ref("Error"), meaning[s]) for s in statuses}


_COMMON = (400, 401, 403, 405, 429, 503)

_ROOM_PARAM = {
    "name": "room",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": 128},
    "example": "lobby",
}


def openapi_document() -> dict[str, Any]:
    """The document (a fresh dict)."""
    scopes = "; ".join(f"`{name}`: {what}" for name, what in SCOPES.items())
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "signalpost server API",
            "version": "1",
            "description": (
                "The app backend's API on every edge (docs/server-api.md). Every operation "
                "but this document needs an API key (`Authorization: Bearer <key>`) with the "
                f"operation's scope. Scopes: {scopes}."
            ),
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/api/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "this document",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}, "the OpenAPI document")},
                }
            },
            "/v1/api/rooms": {
                "get": {
                    "operationId": "listRooms",
                    "summary": "rooms of every broker, by name (scope rooms:read)",
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "description": "`next_cursor` of the previous page (the last "
                            "room name it listed): rooms named after it",
                            "schema": {"type": "string", "maxLength": 128},
                        },
                    ],
                    "responses": {
                        "200": _json(_ref("RoomPage"), "a page of rooms"),
                        **_errors(*_COMMON),
                    },
                }
            },
            "/v1/api/rooms/{room}": {
                "get": {
                    "operationId": "getRoom",
                    "summary": "one room and its members (scope rooms:read)",
                    "parameters": [_ROOM_PARAM],
                    "responses": {
                        "200": _json(_ref("Room"), "the room"),
                        **_errors(*_COMMON, 404),
                    },
                }
            },
            "/v1/api/rooms/{room}/publish": {
                "post": {
                    "operationId": "publish",
                    "summary": "publish to the room, one session or one user's sessions in "
                    "it (scope publish)",
                    "parameters": [_ROOM_PARAM],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("Publish")}},
                    },
                    "responses": {
                        "200": _json(_ref("Published"), "the event's place in the room"),
                        **_errors(*_COMMON, 404, 409, 413),
                    },
                }
            },
            "/v1/api/rooms/{room}/close": {
                "post": {
                    "operationId": "closeRoom",
                    "summary": "every member gets room-closed and leaves (scope rooms:close)",
                    "parameters": [_ROOM_PARAM],
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": _ref("Close")}},
                    },
                    "responses": {
                        "200": _json(_ref("Published"), "the room-closed event's place"),
                        **_errors(*_COMMON, 404, 409, 413),
                    },
                }
            },
            "/v1/api/presence": {
                "get": {
                    "operationId": "presence",
                    "summary": "users' status and sessions (scope presence:read)",
                    "parameters": [
                        {
                            "name": "user",
                            "in": "query",
                            "required": True,
                            "style": "form",
                            "explode": True,
                            "schema": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": 100,
                                "items": {"type": "string", "minLength": 1, "maxLength": 256},
                            },
                            "example": ["alice"],
                        }
                    ],
                    "responses": {
                        "200": _json(_ref("PresenceList"), "each user named"),
                        **_errors(*_COMMON),
                    },
                }
            },
            "/v1/api/kick": {
                "post": {
                    "operationId": "kick",
                    "summary": "end a session (or all of a user's): close 4410, resume "
                    "refused (scope kick)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("Kick")}},
                    },
                    "responses": {
                        "200": _json(_ref("Kicked"), "the sessions ended"),
                        **_errors(*_COMMON, 404, 413),
                    },
                }
            },
            "/v1/api/tokens": {
                "post": {
                    "operationId": "mintToken",
                    "summary": "mint a client token (scope tokens:mint)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("TokenRequest")}},
                    },
                    "responses": {
                        "200": _json(_ref("Token"), "the token"),
                        **_errors(*_COMMON, 413),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT (typ signalpost-api, scope claim)",
                }
            },
            "schemas": _schemas(),
        },
    }


def _schemas() -> dict[str, Any]:
    string = {"type": "string"}
    room_summary = {
        "type": "object",
        "required": ["name", "members", "epoch", "offset"],
        "properties": {
            "name": string,
            "members": {"type": "integer", "minimum": 0},
            "epoch": string,
            "offset": {"type": "integer", "minimum": 0},
        },
    }
    member = {
        "type": "object",
        "required": ["session", "user", "meta", "connected"],
        "properties": {
            "session": string,
            "user": string,
            "name": string,
            "meta": {"type": "object"},
            "connected": {"type": "boolean"},
        },
    }
    idempotency = {
        "type": "string",
        "minLength": 1,
        "maxLength": 48,
        "description": "a retried request with the same key (and API key name) is applied "
        "once, within 120 s",
    }
    return {
        "Error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string", "enum": _ERROR_CODES}, "message": string},
        },
        "RoomSummary": room_summary,
        "RoomPage": {
            "type": "object",
            "required": ["rooms", "next_cursor"],
            "properties": {
                "rooms": {"type": "array", "items": _ref("RoomSummary")},
                "next_cursor": {"type": "string", "nullable": True},
            },
        },
        "Member": member,
        "Room": {
            "type": "object",
            "required": ["name", "members", "epoch", "offset"],
            "properties": {
                "name": string,
                "epoch": string,
                "offset": {"type": "integer", "minimum": 0},
                "members": {"type": "array", "items": _ref("Member")},
            },
        },
        "Publish": {
            "type": "object",
            "required": ["data"],
            "additionalProperties": False,
            "not": {"required": ["to", "to_user"], "description": "`to` or `to_user`, not both"},
            "properties": {
                "data": {"type": "object", "description": "the signal's data (a JSON object)"},
                "to": {"type": "string", "minLength": 1, "maxLength": 64},
                "to_user": {"type": "string", "minLength": 1, "maxLength": 256},
                "idempotency_key": idempotency,
            },
            "example": {"data": {"text": "hello"}, "idempotency_key": "greeting-1"},
        },
        "Close": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "reason": {"type": "string", "maxLength": 256},
                "idempotency_key": idempotency,
            },
        },
        "Published": {
            "type": "object",
            "required": ["room", "epoch", "offset"],
            "properties": {
                "room": string,
                "epoch": string,
                "offset": {"type": "integer", "minimum": 1},
            },
        },
        "Presence": {
            "type": "object",
            "required": ["user", "status", "version", "sessions"],
            "properties": {
                "user": string,
                "status": {"type": "string", "enum": ["online", "offline"]},
                "version": {"type": "integer", "minimum": 0},
                "sessions": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["session", "edge", "connected"],
                        "properties": {
                            "session": string,
                            "edge": string,
                            "connected": {"type": "boolean"},
                        },
                    },
                },
            },
        },
        "PresenceList": {
            "type": "object",
            "required": ["users"],
            "properties": {"users": {"type": "array", "items": _ref("Presence")}},
        },
        "Kick": {
            "type": "object",
            "required": ["user"],
            "additionalProperties": False,
            "properties": {
                "user": {"type": "string", "minLength": 1, "maxLength": 256},
                "session": {"type": "string", "minLength": 1, "maxLength": 64},
                "reason": {"type": "string", "maxLength": 256},
            },
            "example": {"user": "alice", "reason": "banned"},
        },
        "Kicked": {
            "type": "object",
            "required": ["user", "kicked"],
            "properties": {"user": string, "kicked": {"type": "array", "items": string}},
        },
        "TokenRequest": {
            "type": "object",
            "required": ["user"],
            "additionalProperties": False,
            "properties": {
                "user": {"type": "string", "minLength": 1, "maxLength": 256},
                "ttl": {"type": "integer", "minimum": 1, "maximum": 604800},
                "rooms": {
                    "type": "array",
                    "maxItems": 100,
                    "items": {"type": "string", "minLength": 1, "maxLength": 128},
                },
                "name": {"type": "string", "minLength": 1, "maxLength": 256},
                "home": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 64,
                    "description": "the region of the rooms the client opens (multi-region)",
                },
            },
            "example": {"user": "alice", "ttl": 600, "rooms": ["lobby"]},
        },
        "Token": {
            "type": "object",
            "required": ["token", "user", "exp"],
            "properties": {"token": string, "user": string, "exp": {"type": "integer"}},
        },
    }
