"""`kiln invoke`: the request, the answer, streamed server-sent events, and the errors.

moto answers InvokeEndpoint (with queued results) but has no InvokeEndpointWithResponseStream
and no endpoint errors: the stream's request shape and the errors are checked with botocore's
Stubber, and the stream itself comes from a loopback server speaking AWS's event-stream framing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws
from moto.sagemakerruntime.models import sagemakerruntime_backends

from kiln.contract import Component
from kiln_cli.cli import main
from kiln_cli.operate import invoke
from kiln_cli.operate.aws import OperateError
from kiln_cli.operate.invoke import Event, SseParser
from tests.kiln_cli.support import (
    ACCOUNT,
    REGION,
    deploy_stacks,
    make_aws,
    payload_part,
    stream_exception,
)

pytestmark = pytest.mark.usefixtures("stack_outputs")

ENDPOINT = "kiln-dev-llm"
SSE = (
    b": keep-alive\r\n\r\n"
    b'data: {"token": {"id": 72, "text": "Hello"}}\r\n\r\n'
    b'data: {"token": {"id": 44, "text": ", w"}}\n\n'
    + 'data: {"token": {"id": 195, "text": "ö"}}\n\n'.encode()
    + b'data: {"token": {"id": 114, "text": "rld"}}\n\n'
    b'data: {"generated_text": "Hello, w\\u00f6rld", "finish_reason": "length", '
    b'"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}\n\n'
)


def test_sse_parser_is_indifferent_to_where_chunks_end() -> None:
    whole = SseParser()
    expected = whole.feed(SSE) + whole.close()
    assert [json.loads(e.data).get("token", {}).get("text") for e in expected] == [
        "Hello",
        ", w",
        "ö",
        "rld",
        None,
    ]
    bytewise = SseParser()
    events: list[Event] = []
    for index in range(len(SSE)):
        events += bytewise.feed(SSE[index : index + 1])
    assert events + bytewise.close() == expected


def test_sse_fields() -> None:
    parser = SseParser()
    events = parser.feed(b'event: error\ndata: {"a":\ndata: 1}\nid: 7\n\ndata:x\r')
    assert events == [Event("error", '{"a":\n1}')]
    assert parser.close() == [Event("message", "x")]


def _parts(data: bytes, sizes: tuple[int, ...] = (1, 7, 30, 5)) -> Iterator[bytes]:
    """Cuts the SSE bytes into PayloadParts of awkward sizes (mid-line, mid-character)."""
    index, turn = 0, 0
    while index < len(data):
        size = sizes[turn % len(sizes)]
        yield payload_part(data[index : index + size])
        index, turn = index + size, turn + 1


class _Runtime(BaseHTTPRequestHandler):
    """InvokeEndpointWithResponseStream on loopback: answers with the server's `stream`."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server: Any = self.server
        server.requests.append((self.path, dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.amazon.eventstream")
        self.send_header("X-Amzn-SageMaker-Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(server.stream)))
        self.end_headers()
        self.wfile.write(server.stream)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def runtime() -> Iterator[Any]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Runtime)
    server.requests, server.stream = [], b""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


@mock_aws
def test_invoke_sends_inputs_and_parameters_and_prints_the_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    deploy_stacks(components=(Component.SERVING,))
    answer = {
        "generated_text": " world",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 6, "completion_tokens": 16, "total_tokens": 22},
    }
    backend = sagemakerruntime_backends[ACCOUNT][REGION]
    backend.results_queue.append((json.dumps(answer), "application/json", "AllTraffic", ""))
    sent: list[dict[str, Any]] = []
    aws = make_aws()
    aws.client("sagemaker-runtime").meta.events.register(
        "provide-client-params.sagemaker-runtime.InvokeEndpoint",
        lambda params, **_: sent.append(dict(params)),
    )
    result = invoke.invoke(aws, "hello", {"max_new_tokens": 16, "temperature": 0.5, "seed": None})
    assert (result.text, result.finish_reason, result.usage) == (
        " world",
        "length",
        answer["usage"],
    )
    assert sent[0]["EndpointName"] == ENDPOINT
    assert (sent[0]["ContentType"], sent[0]["Accept"]) == ("application/json", "application/json")
    assert json.loads(sent[0]["Body"]) == {
        "inputs": "hello",
        "parameters": {"max_new_tokens": 16, "temperature": 0.5},
    }
    backend.results_queue.append((json.dumps(answer), "application/json", "AllTraffic", ""))
    assert main(["invoke", "--env", "dev", "--prompt", "hi", "--max-new-tokens", "16"]) == 0
    captured = capsys.readouterr()
    assert captured.out == " world\n"
    assert captured.err.startswith("[length, 16 tokens, ")


@mock_aws
def test_an_answer_that_is_not_kilns_json_is_named() -> None:
    deploy_stacks(components=(Component.SERVING,))  # moto's default answer is the text "body"
    with pytest.raises(OperateError, match="answered something other than kiln's JSON: 'body'"):
        invoke.invoke(make_aws(), "hi", {})


def _stubbed_runtime() -> tuple[Any, Stubber]:
    client = boto3.client("sagemaker-runtime", region_name=REGION)
    return client, Stubber(client)


@mock_aws
def test_a_missing_endpoint_says_to_deploy_a_model() -> None:
    deploy_stacks(components=(Component.SERVING,))
    client, stubber = _stubbed_runtime()
    stubber.add_client_error(
        "invoke_endpoint",
        "ValidationError",
        f"Endpoint {ENDPOINT} of account {ACCOUNT} not found.",
    )
    with stubber, pytest.raises(OperateError, match="does not exist: deploy a model first"):
        invoke.invoke(make_aws(clients={"sagemaker-runtime": client}), "hi", {})


@mock_aws
def test_the_servers_own_error_is_shown() -> None:
    deploy_stacks(components=(Component.SERVING,))
    client, stubber = _stubbed_runtime()
    body = {"error": {"code": "invalid_parameter", "message": "parameters.top_p: must be <= 1"}}
    stubber.add_client_error(
        "invoke_endpoint",
        "ModelError",
        "Received client error (400) from primary",
        424,
        modeled_fields={"OriginalStatusCode": 400, "OriginalMessage": json.dumps(body)},
    )
    with stubber, pytest.raises(OperateError) as caught:
        invoke.invoke(make_aws(clients={"sagemaker-runtime": client}), "hi", {"top_p": 2.0})
    assert str(caught.value) == (
        "the model server answered with an error: HTTP 400: parameters.top_p: must be <= 1 "
        "(invalid_parameter)"
    )


@mock_aws
def test_the_stream_request_asks_for_server_sent_events() -> None:
    deploy_stacks(components=(Component.SERVING,))
    client, stubber = _stubbed_runtime()
    stubber.add_response(
        "invoke_endpoint_with_response_stream",
        {"Body": {}, "ContentType": "text/event-stream"},
        {
            "EndpointName": ENDPOINT,
            "ContentType": "application/json",
            "Accept": "text/event-stream",
            "Body": b'{"inputs": "hi", "parameters": {"max_new_tokens": 4}, "stream": true}',
        },
    )
    with stubber, pytest.raises(OperateError, match=r"ended before its final event \(0 tokens"):
        invoke.stream(
            make_aws(clients={"sagemaker-runtime": client}), "hi", {"max_new_tokens": 4}, print
        )
    stubber.assert_no_pending_responses()


@mock_aws
def test_streamed_tokens_are_printed_as_they_arrive(
    runtime: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy_stacks(components=(Component.SERVING,))
    runtime.stream = b"".join(_parts(SSE))
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", runtime.url)
    pieces: list[str] = []
    answer = invoke.stream(make_aws(), "Hel", {"temperature": 0.0}, pieces.append)
    assert pieces == ["Hello", ", w", "ö", "rld"]
    assert (answer.text, answer.finish_reason) == ("Hello, wörld", "length")
    path, headers, body = runtime.requests[0]
    assert path == f"/endpoints/{ENDPOINT}/invocations-response-stream"
    assert headers["X-Amzn-SageMaker-Accept"] == "text/event-stream"
    assert json.loads(body) == {"inputs": "Hel", "parameters": {"temperature": 0.0}, "stream": True}

    assert main(["invoke", "--env", "dev", "--prompt", "Hel", "--stream"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello, wörld\n"
    assert captured.err.startswith("[length, 4 tokens, ")


@mock_aws
@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (
            payload_part(b'data: {"token": {"id": 1, "text": "a"}}\n\n')
            + payload_part(
                b'event: error\ndata: {"error": {"code": "deadline_exceeded", '
                b'"message": "not finished within 60 s"}}\n\n'
            ),
            "the model server stopped the stream: not finished within 60 s (deadline_exceeded)",
        ),
        (
            payload_part(b'data: {"token": {"id": 1, "text": "a"}}\n\n')
            + stream_exception("ModelStreamError", "container crashed"),
            "the stream from kiln-dev-llm failed: ModelStreamError: container crashed",
        ),
    ],
)
def test_a_stream_that_breaks_says_why(
    stream: bytes, message: str, runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    deploy_stacks(components=(Component.SERVING,))
    runtime.stream = stream
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", runtime.url)
    with pytest.raises(OperateError) as caught:
        invoke.stream(make_aws(), "hi", {}, lambda text: None)
    assert str(caught.value) == message


@mock_aws
def test_access_denied_names_the_action() -> None:
    deploy_stacks(components=(Component.SERVING,))
    client, stubber = _stubbed_runtime()
    stubber.add_client_error("invoke_endpoint", "AccessDeniedException", "not authorized", 400)
    with stubber, pytest.raises(OperateError, match="may not call sagemaker:InvokeEndpoint"):
        invoke.invoke(make_aws(clients={"sagemaker-runtime": client}), "hi", {})


# -- conversations: the Messages API -------------------------------------------------------------


def _chunk(delta: dict[str, str] | None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"delta": delta, "finish_reason": finish}]
    chunk = {"object": "chat.completion.chunk", "choices": choices, **extra}
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()


CHAT_SSE = (
    _chunk({"role": "assistant", "content": ""})
    + _chunk({"content": "Bon"})
    + _chunk({"content": "jour, café"})
    + _chunk({}, "stop")
    + _chunk(None, usage={"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14})
    + b"data: [DONE]\n\n"
)


@mock_aws
def test_a_conversation_is_sent_as_messages_and_the_answer_printed(
    capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    deploy_stacks(components=(Component.SERVING,))
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
    backend = sagemakerruntime_backends[ACCOUNT][REGION]
    sent: list[dict[str, Any]] = []
    aws = make_aws()
    aws.client("sagemaker-runtime").meta.events.register(
        "provide-client-params.sagemaker-runtime.InvokeEndpoint",
        lambda params, **_: sent.append(dict(params)),
    )
    backend.results_queue.append((json.dumps(answer), "application/json", "AllTraffic", ""))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    result = invoke.chat(aws, messages, {"max_tokens": 8, "temperature": 0.0, "seed": None})
    assert (result.text, result.finish_reason, result.usage) == ("Hi!", "stop", answer["usage"])
    assert json.loads(sent[0]["Body"]) == {
        "messages": messages,
        "max_tokens": 8,
        "temperature": 0.0,
    }

    backend.results_queue.append((json.dumps(answer), "application/json", "AllTraffic", ""))
    argv = ["invoke", "--env", "dev", "--message", "system:Be brief.", "--message", "user:Hello"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hi!\n" and captured.err.startswith("[stop, 3 tokens, ")

    file = tmp_path / "chat.json"
    file.write_text(json.dumps({"messages": messages}))
    backend.results_queue.append((json.dumps(answer), "application/json", "AllTraffic", ""))
    assert main(["invoke", "--env", "dev", "--messages-file", str(file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == answer


@mock_aws
def test_a_streamed_conversation_prints_the_deltas(
    runtime: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy_stacks(components=(Component.SERVING,))
    runtime.stream = b"".join(_parts(CHAT_SSE))
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", runtime.url)
    pieces: list[str] = []
    messages = [{"role": "user", "content": "Say hello in French"}]
    answer = invoke.chat_stream(make_aws(), messages, {"max_tokens": 5}, pieces.append)
    assert pieces == ["Bon", "jour, café"]
    assert (answer.text, answer.finish_reason, answer.usage["completion_tokens"]) == (
        "Bonjour, café",
        "stop",
        5,
    )
    path, headers, body = runtime.requests[0]
    assert path == f"/endpoints/{ENDPOINT}/invocations-response-stream"
    assert headers["X-Amzn-SageMaker-Accept"] == "text/event-stream"
    assert json.loads(body) == {
        "messages": messages,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    argv = ["invoke", "--env", "dev", "--message", "user:Say hello in French", "--stream"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "Bonjour, café\n"
    assert captured.err.startswith("[stop, 5 tokens, ")


@mock_aws
def test_bad_conversations_are_named(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    deploy_stacks(components=(Component.SERVING,))
    assert main(["invoke", "--env", "dev", "--message", "robot:hi"]) == 2
    assert "ROLE:TEXT with ROLE one of system, user, assistant" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"messages": "hi"}')
    assert main(["invoke", "--env", "dev", "--messages-file", str(tmp_path / "bad.json")]) == 2
    assert "must hold a list of messages" in capsys.readouterr().err
    assert main(["invoke", "--env", "dev", "--message", "user:hi", "--top-k", "5"]) == 2
    assert "--top-k is not a Messages API field" in capsys.readouterr().err
    assert main(["invoke", "--env", "dev", "--messages-file", str(tmp_path / "none.json")]) == 2
    assert "No such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a prompt and a conversation at once
        main(["invoke", "--env", "dev", "--prompt", "x", "--message", "user:y"])


# -- the same client against SageMaker's LMI container (serving.engine: lmi) ---------------------
# Answers in the shapes LMI's vLLM async handler writes them (djl-serving 0.36.0,
# djl_python/lmi_vllm/request_response_utils.py): `details` instead of `finish_reason`/`usage`,
# and JSON Lines instead of server-sent events when streaming.


def _lmi_line(text: str, token_id: int, final: str | None = None, **details: Any) -> bytes:
    line = {
        "index": 0,
        "token": {"id": token_id, "text": text, "logprob": -0.5},
        "generated_text": final,
        "details": details or None,
    }
    return (json.dumps(line, ensure_ascii=False) + "\n").encode()


LMI_JSONLINES = (
    _lmi_line("Hello", 72)
    + _lmi_line(", w", 44)
    + _lmi_line("ö", 195)
    + _lmi_line(
        "rld",
        114,
        "Hello, wörld",
        finish_reason="length",
        generated_tokens=4,
        input_length=3,
        seed=None,
    )
    + b"\n"
)


def _body(payload: Any) -> Any:
    from io import BytesIO

    from botocore.response import StreamingBody  # type: ignore[import-untyped]

    raw = json.dumps(payload).encode()
    return StreamingBody(BytesIO(raw), len(raw))


@mock_aws
@pytest.mark.parametrize(
    ("answer", "finish", "usage"),
    [
        # parameters.details true: LMI adds its details.
        (
            {
                "generated_text": " world",
                "details": {"finish_reason": "length", "generated_tokens": 16, "tokens": []},
            },
            "length",
            {"completion_tokens": 16},
        ),
        # Without details: the text alone.
        ({"generated_text": " world"}, None, {}),
        # OPTION_TGI_COMPAT=true: a one-element list.
        ([{"generated_text": " world"}], None, {}),
    ],
)
def test_lmi_answers_are_read(answer: Any, finish: str | None, usage: dict[str, Any]) -> None:
    deploy_stacks(components=(Component.SERVING,))
    client, stubber = _stubbed_runtime()
    stubber.add_response(
        "invoke_endpoint",
        {"Body": _body(answer), "ContentType": "application/json"},
        {
            "EndpointName": ENDPOINT,
            "ContentType": "application/json",
            "Accept": "application/json",
            "Body": b'{"inputs": "hello", "parameters": {"max_new_tokens": 16}}',
        },
    )
    with stubber:
        result = invoke.invoke(
            make_aws(clients={"sagemaker-runtime": client}), "hello", {"max_new_tokens": 16}
        )
    assert (result.text, result.finish_reason, result.usage) == (" world", finish, usage)


@mock_aws
def test_an_lmi_generation_error_is_named() -> None:
    deploy_stacks(components=(Component.SERVING,))
    client, stubber = _stubbed_runtime()
    failed = {"generated_text": "", "details": {"finish_reason": "error", "tokens": None}}
    stubber.add_response(
        "invoke_endpoint", {"Body": _body(failed), "ContentType": "application/json"}
    )
    with stubber, pytest.raises(OperateError, match="failed the generation"):
        invoke.invoke(make_aws(clients={"sagemaker-runtime": client}), "hi", {})


@mock_aws
def test_an_lmi_json_lines_stream_prints_the_tokens(
    runtime: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy_stacks(components=(Component.SERVING,))
    runtime.stream = b"".join(_parts(LMI_JSONLINES))
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", runtime.url)
    pieces: list[str] = []
    answer = invoke.stream(make_aws(), "Hel", {"max_new_tokens": 4}, pieces.append)
    assert pieces == ["Hello", ", w", "ö", "rld"]
    assert (answer.text, answer.finish_reason, answer.usage) == (
        "Hello, wörld",
        "length",
        {"completion_tokens": 4, "prompt_tokens": 3},
    )
    _, _, body = runtime.requests[0]
    # LMI streams only when the body says so.
    assert json.loads(body)["stream"] is True
    assert main(["invoke", "--env", "dev", "--prompt", "Hel", "--stream"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello, wörld\n" and captured.err.startswith("[length, 4 tokens, ")


@mock_aws
def test_an_lmi_chat_stream_of_json_lines_prints_the_deltas(
    runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LMI strips vLLM's `data: ` and `[DONE]`: one chat.completion.chunk per line."""
    deploy_stacks(components=(Component.SERVING,))
    lines = [
        line.removeprefix(b"data: ") + b"\n"
        for line in CHAT_SSE.split(b"\n\n")
        if line and line != b"data: [DONE]"
    ]
    runtime.stream = b"".join(_parts(b"".join(lines)))
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", runtime.url)
    pieces: list[str] = []
    messages = [{"role": "user", "content": "Say hello in French"}]
    answer = invoke.chat_stream(make_aws(), messages, {"max_tokens": 5}, pieces.append)
    assert pieces == ["Bon", "jour, café"]
    assert (answer.text, answer.finish_reason, answer.usage["completion_tokens"]) == (
        "Bonjour, café",
        "stop",
        5,
    )


def test_json_lines_and_sse_parse_alike() -> None:
    sse = SseParser()
    lines = SseParser()
    from_sse = sse.feed(SSE) + sse.close()
    json_lines = b"".join(
        chunk.removeprefix(b"data: ") + b"\n"
        for chunk in SSE.replace(b"\r\n", b"\n").split(b"\n\n")
        if chunk.startswith(b"data: ")
    )
    assert lines.feed(json_lines) + lines.close() == from_sse
