"""The SageMaker contract against a real server process on loopback: answers, streams, batching."""

from __future__ import annotations

import http.client
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.inference.conftest import EVENTS_TOPIC
from tests.inference.support import Reply, Server, invoke, request


def tokens_of(reply: Reply) -> list[int]:
    """The token ids of a streamed reply (the tail event carries no id)."""
    assert reply.status == 200, reply.body
    return [
        data["token"]["id"]
        for name, data in reply.sse()
        if name == "message" and "token" in data and data["token"]["id"] is not None
    ]


def test_ping_is_ready_and_cheap(server: Server) -> None:
    reply = request(server.port, "GET", "/ping")
    assert reply.status == 200
    assert reply.json() == {"status": "ready"}


def test_invocation_answers_generated_text_and_usage(server: Server) -> None:
    reply = invoke(server.port, "def main():", max_new_tokens=12)
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert set(body) == {"generated_text", "finish_reason", "usage"}
    assert isinstance(body["generated_text"], str) and body["generated_text"]
    assert body["finish_reason"] == "length"
    # Byte-level tokenizer: the prompt is its 11 bytes after the BOS token.
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 12, "total_tokens": 24}
    assert reply.headers["x-kiln-request-id"]


def test_parameters_are_optional(server: Server) -> None:
    body = json.dumps({"inputs": "hello"}).encode()
    reply = request(server.port, "POST", "/invocations", body, {"Content-Type": "application/json"})
    assert reply.status == 200
    assert reply.json()["usage"]["completion_tokens"] == 64  # the default max_new_tokens


def test_stream_sends_tokens_then_the_result(server: Server) -> None:
    reply = invoke(server.port, "stream me", stream=True, max_new_tokens=20)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = reply.sse()
    *tokens, final = events
    assert all(name == "message" and "token" in data for name, data in tokens)
    assert len([t for _, t in tokens if t["token"]["id"] is not None]) == 20
    assert final[1]["finish_reason"] == "length"
    assert final[1]["usage"]["completion_tokens"] == 20
    # The streamed pieces add up to the final text, and match the unstreamed answer.
    assert "".join(t["token"]["text"] for _, t in tokens) == final[1]["generated_text"]
    plain = invoke(server.port, "stream me", max_new_tokens=20).json()
    assert plain["generated_text"] == final[1]["generated_text"]


def printable_pair(tokens: list[int]) -> str:
    """Two printable ASCII bytes generated one after the other (not at the very start)."""
    for i in range(1, len(tokens) - 1):
        if all(32 <= t < 127 for t in tokens[i : i + 2]):
            return bytes(tokens[i : i + 2]).decode()
    pytest.fail(f"no two printable bytes in a row in {tokens}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_generation_and_is_left_out(server: Server, stream: bool) -> None:
    tokens = tokens_of(invoke(server.port, "stop here", stream=True, max_new_tokens=60))
    stop = printable_pair(tokens)
    # Where the stop string first appears in the text (special tokens add no bytes).
    text, used = bytearray(), 0
    for token in tokens:
        used += 1
        text += bytes([token]) if token < 256 else b""
        if text.endswith(stop.encode()):
            break
    expected = bytes(text[:-2]).decode("utf-8", errors="replace")
    reply = invoke(
        server.port, "stop here", stream=stream, max_new_tokens=60, stop=[stop, "\x00\x01"]
    )
    if stream:
        *pieces, (_, final) = reply.sse()
        assert "".join(p["token"]["text"] for _, p in pieces) == expected
    else:
        final = reply.json()
    assert final["finish_reason"] == "stop"
    assert final["generated_text"] == expected
    assert final["usage"]["completion_tokens"] == used


def test_sampling_is_reproducible_with_a_seed(server: Server) -> None:
    params: dict[str, Any] = {"max_new_tokens": 24, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    a = invoke(server.port, "once upon", seed=1234, **params).json()["generated_text"]
    b = invoke(server.port, "once upon", seed=1234, **params).json()["generated_text"]
    c = invoke(server.port, "once upon", seed=99, **params).json()["generated_text"]
    streamed = tokens_of(invoke(server.port, "once upon", stream=True, seed=1234, **params))
    assert a == b
    assert a != c
    assert bytes(t for t in streamed if t < 256).decode("utf-8", errors="replace") == a


def test_32_concurrent_requests_match_their_runs_alone(server: Server) -> None:
    """Greedy and seeded outputs are the same alone and inside a batch of 32."""
    prompts = [f"request {i}: " + "lorem ipsum " * (i % 7) for i in range(32)]
    sampled = {3, 10, 17, 28}

    def params(i: int) -> dict[str, Any]:
        if i in sampled:
            return {"max_new_tokens": 32 + i, "temperature": 0.9, "top_k": 40, "seed": i}
        return {"max_new_tokens": 32 + i}

    alone = [invoke(server.port, prompts[i], **params(i)) for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        together = list(pool.map(lambda i: invoke(server.port, prompts[i], **params(i)), range(32)))
    for i in range(32):
        assert alone[i].status == together[i].status == 200, together[i].body
        assert together[i].json() == alone[i].json(), f"request {i} differs in a batch"


def test_ping_answers_fast_under_load(server: Server) -> None:
    with ThreadPoolExecutor(max_workers=33) as pool:
        load = [
            pool.submit(invoke, server.port, f"load {i}", max_new_tokens=400) for i in range(32)
        ]
        time.sleep(0.2)
        slowest = 0.0
        for _ in range(10):
            t0 = time.monotonic()
            reply = request(server.port, "GET", "/ping", timeout=5)
            slowest = max(slowest, time.monotonic() - t0)
            assert reply.status == 200
            time.sleep(0.05)
        assert all(f.result().status == 200 for f in load)
    assert slowest < 2.0, f"/ping took {slowest:.2f} s under load"


def read_events(bootstrap: str, wanted: set[str], timeout: float = 20.0) -> dict[str, Any]:
    """The events of the topic whose request ids are in `wanted`, by request id."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from kiln_events.events import PredictionEvent

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}"})
    found: dict[str, PredictionEvent] = {}
    try:
        deadline = time.monotonic() + timeout
        partitions: list[int] = []
        while not partitions and time.monotonic() < deadline:
            topic = consumer.list_topics(EVENTS_TOPIC, timeout=5).topics[EVENTS_TOPIC]
            partitions = list(topic.partitions) if topic.error is None else []
        consumer.assign([TopicPartition(EVENTS_TOPIC, p, OFFSET_BEGINNING) for p in partitions])
        while wanted - set(found) and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.2):
                assert msg.error() is None, msg.error()
                event = PredictionEvent.from_json(msg.value())
                if event.request_id in wanted:
                    found[event.request_id] = event
    finally:
        consumer.close()
    return found


def test_every_request_publishes_a_prediction_event(server: Server, kafka: str) -> None:
    ok_id, bad_id = f"ok-{uuid.uuid4()}", f"bad-{uuid.uuid4()}"
    header = "X-Amzn-SageMaker-Inference-Id"
    ok = invoke(server.port, "event me", headers={header: ok_id}, max_new_tokens=5)
    bad = invoke(server.port, "event me", headers={header: bad_id}, top_p=7)
    assert (ok.status, bad.status) == (200, 400)
    assert ok.headers["x-kiln-request-id"] == ok_id
    events = read_events(kafka, {ok_id, bad_id})
    assert set(events) == {ok_id, bad_id}
    good = events[ok_id]
    assert good.status_code == 200 and good.error_code is None
    assert (good.prompt_tokens, good.completion_tokens) == (9, 5)
    assert (good.endpoint_name, good.model_version) == ("kiln-test-chat", "v-test")
    assert good.prompt_text is None and good.completion_text is None  # raw text not allowed
    assert good.response_completed_at >= good.request_received_at and good.latency_ms > 0
    assert (events[bad_id].status_code, events[bad_id].error_code) == (400, "invalid_parameter")


def test_a_client_that_hangs_up_stops_its_generation(server: Server, kafka: str) -> None:
    request_id = f"gone-{uuid.uuid4()}"
    body = json.dumps({"inputs": "never read", "parameters": {"max_new_tokens": 2000}})
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "X-Amzn-SageMaker-Inference-Id": request_id,
    }
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/invocations", body, headers)
    response = conn.getresponse()
    assert response.status == 200
    response.read(64)  # the first token has arrived
    conn.close()
    event = read_events(kafka, {request_id})[request_id]
    assert (event.status_code, event.error_code) == (499, "client_closed")
    assert event.completion_tokens < 2000  # the engine stopped generating for it


def test_an_empty_prompt_generates_text_from_the_start_token(server: Server) -> None:
    """`{"inputs": ""}` is the model's unconditional text: it starts after the start token and
    never emits it (or padding) again, so the answer is text, not nothing."""
    reply = invoke(server.port, "", stream=True, max_new_tokens=16)
    ids = tokens_of(reply)
    assert ids and all(0 <= i < 256 for i in ids), ids
    final = reply.sse()[-1][1]
    assert final["usage"]["prompt_tokens"] == 1
    assert "\ufffd" not in final["generated_text"]  # bytes that make whole characters only
