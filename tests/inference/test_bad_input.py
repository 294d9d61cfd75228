"""Every kind of bad request gets a JSON error naming the problem, and the server carries on."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

import pytest

from tests.inference.support import Server, invoke, request

JSON = {"Content-Type": "application/json"}


def post(server: Server, body: bytes, headers: dict[str, str] | None = None) -> Any:
    return request(server.port, "POST", "/invocations", body, JSON if headers is None else headers)


@pytest.mark.parametrize(
    ("body", "code", "mentions"),
    [
        (b'{"inputs": "x"', "invalid_json", "not valid JSON"),
        (b"", "invalid_json", "not valid JSON"),
        (b"\xff\xfe{}", "invalid_json", "UTF-8"),
        (b'["a list"]', "invalid_request", "JSON object"),
        (b"{}", "invalid_parameter", "inputs is required"),
        (b'{"inputs": 5}', "invalid_parameter", "inputs"),
        (b'{"inputs": "x", "streaming": true}', "invalid_parameter", "unknown field 'streaming'"),
        (b'{"inputs": "x", "stream": "yes"}', "invalid_parameter", "stream"),
        (b'{"inputs": "x", "parameters": []}', "invalid_parameter", "parameters"),
    ],
)
def test_malformed_bodies(server: Server, body: bytes, code: str, mentions: str) -> None:
    reply = post(server, body)
    assert reply.status == 400
    assert reply.error["code"] == code
    assert mentions in reply.error["message"]


@pytest.mark.parametrize(
    ("parameters", "field", "mentions"),
    [
        ({"max_new_tokens": 0}, "parameters.max_new_tokens", "greater than or equal to 1"),
        ({"max_new_tokens": 5.0}, "parameters.max_new_tokens", "valid integer"),
        ({"max_new_tokens": "5"}, "parameters.max_new_tokens", "valid integer"),
        ({"max_new_tokens": 5000}, "parameters.max_new_tokens", "more than the 2046"),
        ({"temperature": -0.1}, "parameters.temperature", "greater than or equal to 0"),
        ({"temperature": 1000}, "parameters.temperature", "less than or equal to 100"),
        ({"temperature": True}, "parameters.temperature", "valid number"),
        ({"top_k": 0}, "parameters.top_k", "greater than or equal to 1"),
        ({"top_k": 10_000}, "parameters.top_k", "vocabulary"),
        ({"top_p": 0}, "parameters.top_p", "greater than 0"),
        ({"top_p": 1.5}, "parameters.top_p", "less than or equal to 1"),
        ({"seed": -1}, "parameters.seed", "greater than or equal to 0"),
        ({"seed": 2**64}, "parameters.seed", "less than or equal to"),
        ({"stop": 5}, "parameters.stop", "string or a list of strings"),
        ({"stop": [""]}, "parameters.stop", "1 to 128 characters"),
        ({"stop": ["a"] * 9}, "parameters.stop", "at most 8"),
        ({"beams": 4}, "parameters.beams", "unknown parameter 'beams'; known: max_new_tokens"),
    ],
)
def test_bad_parameters(
    server: Server, parameters: dict[str, Any], field: str, mentions: str
) -> None:
    reply = invoke(server.port, "x", **parameters)
    assert reply.status == 400, reply.body
    assert reply.error["code"] == "invalid_parameter"
    assert reply.error["field"] == field
    assert mentions in reply.error["message"]


def test_nan_is_not_a_temperature(server: Server) -> None:
    reply = post(server, b'{"inputs": "x", "parameters": {"temperature": NaN}}')
    assert reply.status == 400
    assert "finite number" in reply.error["message"]


def test_prompt_longer_than_the_context(server: Server) -> None:
    reply = invoke(server.port, "y" * 2047)
    assert reply.status == 400
    assert reply.error["code"] == "prompt_too_long"
    assert "2048" in reply.error["message"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type(server: Server, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    reply = post(server, b'{"inputs": "x"}', headers)
    assert reply.status == 400
    assert reply.error["code"] == "unsupported_content_type"
    assert "application/json" in reply.error["message"]


def test_json_with_a_charset_is_fine(server: Server) -> None:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    reply = post(server, b'{"inputs": "x", "parameters": {"max_new_tokens": 2}}', headers)
    assert reply.status == 200


def test_unacceptable_accept_header(server: Server) -> None:
    headers = {**JSON, "Accept": "application/xml"}
    reply = post(server, b'{"inputs": "x"}', headers)
    assert reply.status == 406
    assert reply.error["code"] == "not_acceptable"


def test_body_over_6_mb_is_refused_by_its_length(server: Server) -> None:
    body = json.dumps({"inputs": "z" * (6 * 1024 * 1024)}).encode()
    reply = post(server, body)
    assert reply.status == 413
    assert reply.error["code"] == "payload_too_large"


def test_chunked_body_over_6_mb_is_refused_while_read(server: Server) -> None:
    """No Content-Length to check up front: the server counts as it reads."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", "/invocations")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        chunk = b"a" * 65536
        try:
            for _ in range(6 * 16 + 2):  # a little over 6 MiB
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before the whole body is sent
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["code"] == "payload_too_large"
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/invocations", 405, "method_not_allowed"),
        ("POST", "/ping", 405, "method_not_allowed"),
        ("GET", "/nowhere", 404, "not_found"),
    ],
)
def test_wrong_routes(server: Server, method: str, path: str, status: int, code: str) -> None:
    reply = request(server.port, method, path)
    assert reply.status == status
    assert reply.error["code"] == code


def test_garbage_on_the_socket_does_not_wedge_the_server(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        sock.recv(1024)  # uvicorn answers 400 (or closes)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        # ...and hangs up mid-body.
    assert request(server.port, "GET", "/ping").status == 200
    assert invoke(server.port, "still alive", max_new_tokens=3).status == 200


def test_a_model_without_a_chat_template_refuses_messages(server: Server) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    reply = post(server, body)
    assert reply.status == 400
    assert reply.error["code"] == "no_chat_template" and reply.error["field"] == "messages"
    assert "this model has no chat template" in reply.error["message"]
    assert invoke(server.port, "x", max_new_tokens=2).status == 200  # plain prompts still work
