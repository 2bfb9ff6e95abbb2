"""The bundled mock Mistral upstream on its own (no Envoy): it must be as strict and as hostile as
the real API (compression when asked, `n` choices, every metered route with its real usage shape,
Starlette's routing, chunked request bodies), or it hides billing bugs in the filter."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import time
import uuid
import zlib

import pytest

CHAT = {"model": "mistral-small-latest", "max_tokens": 10, "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
def key(mock_keys) -> str:
    return mock_keys["prod"]


def call(mock, method: str, path: str, body=None, *, key: str | None, headers: dict | None = None):
    """One request over http.client (the path goes out exactly as given). Returns
    (status, lower-cased headers, raw body bytes as sent on the wire, after chunked decoding)."""
    conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=10)
    hdrs = dict(headers or {})
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        hdrs["Content-Length"] = str(len(body or b""))
    try:
        # No Accept-Encoding unless the test names one (http.client would add `identity`).
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in hdrs.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def decoded(headers: dict, data: bytes) -> bytes:
    coding = headers.get("content-encoding")
    if coding == "gzip":
        assert data[:2] == b"\x1f\x8b", "not a gzip stream"
        return gzip.decompress(data)
    if coding == "deflate":
        return zlib.decompress(data)  # a zlib stream (RFC 1950), not raw deflate
    assert coding is None, coding
    return data


def as_json(headers: dict, data: bytes):
    return json.loads(decoded(headers, data))


def sse(text: bytes) -> list[tuple[str | None, str]]:
    """(event name or None, data) for every event of an SSE body."""
    out = []
    for block in text.decode().split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        out.append((name, "\n".join(data)))
    return out


def post(mock, path, body, key, **kw):
    return call(mock, "POST", path, body, key=key, **kw)


def last_request(mock) -> dict:
    return mock.requests()[-1]


# --- compression -----------------------------------------------------------------------------

def test_gzip_when_the_client_accepts_it(mock_mistral, key):
    # What the official Python SDK (httpx) sends on every request.
    status, headers, data = post(mock_mistral, "/v1/chat/completions", CHAT, key,
                                 headers={"Accept-Encoding": "gzip, deflate"})
    assert status == 200
    assert headers["content-encoding"] == "gzip" and headers["vary"] == "Accept-Encoding"
    assert int(headers["content-length"]) == len(data)
    with pytest.raises(ValueError):
        json.loads(data)  # a filter reading the body as JSON without decompressing sees garbage
    doc = as_json(headers, data)
    assert doc["object"] == "chat.completion"
    assert doc["usage"]["completion_tokens"] == 10 and doc["usage"]["prompt_tokens"] == len("hello there") // 4 + 1
    seen = last_request(mock_mistral)
    assert seen["headers"]["accept-encoding"] == "gzip, deflate"
    assert seen["accept_encoding"] == "gzip, deflate" and seen["response_encoding"] == "gzip"


@pytest.mark.parametrize("accept", ["deflate", "gzip;q=0, deflate", "deflate;q=0.5, identity"])
def test_deflate_is_a_zlib_stream(mock_mistral, key, accept):
    status, headers, data = post(mock_mistral, "/v1/embeddings",
                                 {"model": "mistral-embed", "input": ["a", "b"]}, key,
                                 headers={"Accept-Encoding": accept})
    assert status == 200 and headers["content-encoding"] == "deflate"
    doc = as_json(headers, data)
    assert len(doc["data"]) == 2 and doc["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize("accept", [None, "", "identity", "gzip;q=0", "br", "gzip;q=0, deflate;q=0.0"])
def test_plain_when_compression_is_not_accepted(mock_mistral, key, accept):
    headers = {"Accept-Encoding": accept} if accept is not None else {}
    status, resp_headers, data = post(mock_mistral, "/v1/chat/completions", CHAT, key, headers=headers)
    assert status == 200
    assert "content-encoding" not in resp_headers
    assert json.loads(data)["usage"]["completion_tokens"] == 10
    assert last_request(mock_mistral)["response_encoding"] is None


def test_wildcard_accepts_gzip(mock_mistral, key):
    _, headers, data = post(mock_mistral, "/v1/chat/completions", CHAT, key, headers={"Accept-Encoding": "*"})
    assert headers["content-encoding"] == "gzip"
    assert as_json(headers, data)["object"] == "chat.completion"


def test_errors_are_compressed_too(mock_mistral, key):
    status, headers, data = post(mock_mistral, "/v1/chat/completions", CHAT, "x" * 32,
                                 headers={"Accept-Encoding": "gzip"})
    assert (status, headers["content-encoding"]) == (401, "gzip")
    assert as_json(headers, data) == {"detail": "Invalid API Key"}

    mock_mistral.behaviour(status=503)
    status, headers, data = post(mock_mistral, "/v1/chat/completions", CHAT, key,
                                 headers={"Accept-Encoding": "deflate"})
    assert (status, headers["content-encoding"]) == (503, "deflate")
    err = as_json(headers, data)
    assert err["object"] == "error" and "usage" not in err


def test_compressed_sse_still_streams_event_by_event(mock_mistral, key):
    mock_mistral.behaviour(stream_chunks=4, chunk_delay_ms=150)
    conn = http.client.HTTPConnection("127.0.0.1", mock_mistral.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**CHAT, "stream": True}),
                 headers={"Authorization": f"Bearer {key}", "Accept-Encoding": "gzip, deflate",
                          "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("content-encoding") == "gzip"
    assert resp.getheader("content-type") == "text/event-stream; charset=utf-8"
    assert resp.getheader("transfer-encoding") == "chunked"
    inflate = zlib.decompressobj(wbits=31)
    start = time.monotonic()
    first = inflate.decompress(resp.read1(65536))
    # The first wire chunk inflates to a whole event, long before the stream ends (Z_SYNC_FLUSH).
    assert first.startswith(b"data: {") and first.endswith(b"\n\n")
    assert time.monotonic() - start < 0.4
    text = first
    while chunk := resp.read1(65536):
        text += inflate.decompress(chunk)
    text += inflate.flush()
    assert inflate.eof  # a complete gzip member, trailer included
    conn.close()
    events = [d for _, d in sse(text)]
    assert events[-1] == "[DONE]"
    docs = [json.loads(d) for d in events[:-1]]
    with_usage = [d for d in docs if "usage" in d]
    assert len(with_usage) == 1 and with_usage[0] is docs[-1]
    assert with_usage[0]["choices"][0]["finish_reason"] == "stop"
    assert with_usage[0]["usage"]["completion_tokens"] == 10


def test_compressed_event_stream_of_a_conversation(mock_mistral, key):
    status, headers, data = post(mock_mistral, "/v1/conversations",
                                 {"model": "mistral-small-latest", "inputs": "hi", "stream": True,
                                  "completion_args": {"max_tokens": 5}}, key,
                                 headers={"Accept-Encoding": "deflate"})
    assert status == 200 and headers["content-encoding"] == "deflate"
    events = sse(decoded(headers, data))
    assert events[-1][0] == "conversation.response.done"
    assert json.loads(events[-1][1])["usage"]["completion_tokens"] == 5


def test_the_control_api_is_never_compressed(mock_mistral):
    status, headers, data = call(mock_mistral, "GET", "/__mock/requests", key=None,
                                 headers={"Accept-Encoding": "gzip"})
    assert status == 200 and "content-encoding" not in headers
    assert json.loads(data) == []


# --- n choices -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/fim/completions", "/v1/agents/completions"])
def test_n_choices_bill_n_times(mock_mistral, key, path):
    body = {**CHAT, "n": 3}
    if path == "/v1/fim/completions":
        body = {"model": "codestral-latest", "prompt": "def f(", "max_tokens": 10, "n": 3}
    if path == "/v1/agents/completions":
        body = {"agent_id": "ag_1", "messages": CHAT["messages"], "max_tokens": 10, "n": 3}
    status, headers, data = post(mock_mistral, path, body, key)
    assert status == 200, data
    doc = json.loads(data)
    assert [c["index"] for c in doc["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] for c in doc["choices"])
    usage = doc["usage"]
    assert usage["completion_tokens"] == 30
    assert usage["total_tokens"] == usage["prompt_tokens"] + 30


def test_n_choices_stream_one_sequence_per_choice_and_usage_once(mock_mistral, key):
    mock_mistral.behaviour(stream_chunks=2)
    status, headers, data = post(mock_mistral, "/v1/chat/completions",
                                 {**CHAT, "max_tokens": 50, "n": 3, "stream": True}, key)
    assert status == 200
    events = [d for _, d in sse(data)]
    assert events[-1] == "[DONE]"
    docs = [json.loads(d) for d in events[:-1]]
    indexes = [d["choices"][0]["index"] for d in docs]
    assert indexes == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # role chunk + 2 content chunks per choice
    finished = [d for d in docs if d["choices"][0]["finish_reason"] == "stop"]
    assert [d["choices"][0]["index"] for d in finished] == [0, 1, 2]
    with_usage = [d for d in docs if "usage" in d]
    assert with_usage == [finished[-1]] == [docs[-1]]
    assert with_usage[0]["usage"]["completion_tokens"] == 48  # 3 x min(50, 16)


def test_a_forced_usage_is_the_total_over_choices(mock_mistral, key):
    mock_mistral.behaviour(usage={"prompt_tokens": 7, "completion_tokens": 90})
    doc = json.loads(post(mock_mistral, "/v1/chat/completions", {**CHAT, "n": 3}, key)[2])
    assert len(doc["choices"]) == 3
    assert (doc["usage"]["prompt_tokens"], doc["usage"]["completion_tokens"]) == (7, 90)


@pytest.mark.parametrize("n, error", [(0, "greater_than_equal"), (-2, "greater_than_equal"),
                                      ("three", "int_parsing"), (1.5, "int_from_float"),
                                      ([2], "int_type"), ({"n": 2}, "int_type")])
def test_bad_n_is_a_fastapi_422(mock_mistral, key, n, error):
    status, _, data = post(mock_mistral, "/v1/chat/completions", {**CHAT, "n": n}, key)
    assert status == 422
    [detail] = json.loads(data)["detail"]
    assert detail["type"] == error and detail["loc"] == ["body", "n"] and detail["msg"]


@pytest.mark.parametrize("n", ["3", 3.0])
def test_n_is_read_like_pydantic_lax_mode(mock_mistral, key, n):
    # The real API (FastAPI + pydantic) coerces these: a filter that ignores them under-bills.
    doc = json.loads(post(mock_mistral, "/v1/chat/completions", {**CHAT, "n": n}, key)[2])
    assert len(doc["choices"]) == 3 and doc["usage"]["completion_tokens"] == 30


@pytest.mark.parametrize("stream, streams", [("true", True), (1, True), ("false", False), (None, False)])
def test_stream_is_read_like_pydantic_lax_mode(mock_mistral, key, stream, streams):
    status, headers, data = post(mock_mistral, "/v1/chat/completions", {**CHAT, "stream": stream}, key)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream") is streams
    if not streams:
        assert json.loads(data)["usage"]["completion_tokens"] == 10


# --- the Responses API ---------------------------------------------------------------------------

def test_responses_shape_and_usage(mock_mistral, key):
    body = {"model": "mistral-medium-latest", "max_output_tokens": 5, "instructions": "be brief",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "x" * 40}]}],
            "max_tokens": 500}
    status, _, data = post(mock_mistral, "/v1/responses", body, key)
    assert status == 200
    doc = json.loads(data)
    assert doc["id"].startswith("resp_") and doc["object"] == "response" and doc["model"] == "mistral-medium-latest"
    [message] = doc["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"][0]["type"] == "output_text" and message["content"][0]["text"]
    usage = doc["usage"]
    assert usage["input_tokens"] == len("be brief" + "x" * 40) // 4 + 1
    assert usage["output_tokens"] == 5
    assert usage["total_tokens"] == usage["input_tokens"] + 5
    assert "prompt_tokens" not in usage and "completion_tokens" not in usage

    uncapped = json.loads(post(mock_mistral, "/v1/responses", {"model": "m", "input": "hi"}, key)[2])
    assert uncapped["usage"]["output_tokens"] == 16


def test_responses_stream(mock_mistral, key):
    mock_mistral.behaviour(stream_chunks=3)
    status, headers, data = post(mock_mistral, "/v1/responses",
                                 {"model": "mistral-small-latest", "input": "hello", "stream": True,
                                  "max_output_tokens": 9}, key)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse(data)
    names = [e for e, _ in events]
    assert names == ["response.created"] + ["response.output_text.delta"] * 3 + ["response.completed"]
    deltas = [json.loads(d) for e, d in events if e == "response.output_text.delta"]
    assert all(d["type"] == "response.output_text.delta" and d["delta"] for d in deltas)
    done = json.loads(events[-1][1])
    assert done["type"] == "response.completed"
    assert done["response"]["usage"]["output_tokens"] == 9
    assert done["response"]["usage"]["input_tokens"] == len("hello") // 4 + 1
    assert "[DONE]" not in data.decode()


def test_responses_input_tokens_has_no_usage(mock_mistral, key):
    status, _, data = post(mock_mistral, "/v1/responses/input_tokens",
                           {"model": "mistral-small-latest", "input": "y" * 80}, key)
    assert status == 200
    assert json.loads(data) == {"object": "response.input_tokens", "input_tokens": 21}


def test_responses_need_model_and_input(mock_mistral, key):
    status, _, data = post(mock_mistral, "/v1/responses", {"input": "hi"}, key)
    assert status == 422 and json.loads(data)["detail"][0]["loc"] == ["body", "model"]
    status, _, data = post(mock_mistral, "/v1/responses", {"model": "m"}, key)
    assert status == 422 and json.loads(data)["detail"][0]["loc"] == ["body", "input"]


# --- conversations -------------------------------------------------------------------------------

def test_conversation_start_append_restart(mock_mistral, key):
    status, _, data = post(mock_mistral, "/v1/conversations",
                           {"model": "mistral-large-latest", "inputs": "z" * 20,
                            "completion_args": {"max_tokens": 7}}, key)
    assert status == 200
    doc = json.loads(data)
    assert doc["object"] == "conversation.response" and doc["conversation_id"].startswith("conv_")
    [out] = doc["outputs"]
    assert (out["object"], out["type"], out["role"], out["model"]) == \
        ("entry", "message.output", "assistant", "mistral-large-latest")
    assert out["content"]
    assert doc["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13, "connector_tokens": None}

    conv = doc["conversation_id"]
    # A top-level max_tokens is not read by Mistral: the output is uncapped (16 here).
    appended = json.loads(post(mock_mistral, f"/v1/conversations/{conv}",
                               {"inputs": [{"role": "user", "content": "more"}], "max_tokens": 2}, key)[2])
    assert appended["conversation_id"] == conv
    assert appended["outputs"][0]["model"] == "mistral-large-latest"  # the model is the conversation's
    assert appended["usage"]["completion_tokens"] == 16

    restarted = json.loads(post(mock_mistral, f"/v1/conversations/{conv}/restart",
                                {"from_entry_id": "msg_1", "inputs": "again",
                                 "completion_args": {"max_tokens": 3}}, key)[2])
    assert restarted["usage"]["completion_tokens"] == 3


def test_conversation_with_an_agent(mock_mistral, key):
    mock_mistral.behaviour(agent_model="mistral-small-latest")
    doc = json.loads(post(mock_mistral, "/v1/conversations", {"agent_id": "ag_9", "inputs": "hi"}, key)[2])
    assert doc["outputs"][0]["model"] == "mistral-small-latest" and doc["outputs"][0]["agent_id"] == "ag_9"
    status, _, data = post(mock_mistral, "/v1/conversations", {"inputs": "hi"}, key)
    assert status == 400 and json.loads(data)["object"] == "error"
    status, _, data = post(mock_mistral, "/v1/conversations", {"model": "m"}, key)
    assert status == 422 and json.loads(data)["detail"][0]["loc"] == ["body", "inputs"]


def test_conversation_stream(mock_mistral, key):
    mock_mistral.behaviour(stream_chunks=2)
    status, _, data = post(mock_mistral, "/v1/conversations",
                           {"model": "mistral-small-latest", "inputs": "hi", "stream": True,
                            "completion_args": {"max_tokens": 4}}, key)
    assert status == 200
    events = sse(data)
    assert [e for e, _ in events] == ["conversation.response.started", "message.output.delta",
                                      "message.output.delta", "conversation.response.done"]
    started = json.loads(events[0][1])
    assert started["type"] == "conversation.response.started" and started["conversation_id"].startswith("conv_")
    done = json.loads(events[-1][1])
    assert done["type"] == "conversation.response.done"
    assert done["usage"]["completion_tokens"] == 4 and done["usage"]["connector_tokens"] is None
    assert "[DONE]" not in data.decode()


# --- OCR, transcription, moderation, classification ----------------------------------------------

@pytest.mark.parametrize("pages, processed", [([0, 1], 2), ("0,2-4", 4), (None, 3)])
def test_ocr_usage_info(mock_mistral, key, pages, processed):
    body = {"model": "mistral-ocr-latest", "document": {"type": "document_url", "document_url": "https://x/y.pdf"}}
    if pages is not None:
        body["pages"] = pages
    status, _, data = post(mock_mistral, "/v1/ocr", body, key)
    assert status == 200
    doc = json.loads(data)
    assert doc["model"] == "mistral-ocr-2505"  # the alias resolved: not the requested name
    assert doc["usage_info"] == {"pages_processed": processed, "doc_size_bytes": 1234}
    assert len(doc["pages"]) == processed and all(p["markdown"] for p in doc["pages"])
    assert "usage" not in doc
    if isinstance(pages, list):
        assert [p["index"] for p in doc["pages"]] == pages


def test_ocr_pages_behaviour(mock_mistral, key):
    mock_mistral.behaviour(ocr_pages=7)
    doc = json.loads(post(mock_mistral, "/v1/ocr", {"model": "mistral-ocr-latest",
                                                    "document": {"type": "image_url", "image_url": "x"}}, key)[2])
    assert doc["usage_info"]["pages_processed"] == 7


def multipart(fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = b""
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, content = value
            out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                    "Content-Type: audio/mpeg\r\n\r\n").encode() + content + b"\r\n"
        else:
            out += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def test_transcription(mock_mistral, key):
    body, ctype = multipart({"model": "voxtral-mini-latest", "file": ("a.mp3", b"\x00\xffID3" * 100)})
    status, _, data = post(mock_mistral, "/v1/audio/transcriptions", body, key, headers={"Content-Type": ctype})
    assert status == 200, data
    doc = json.loads(data)
    assert (doc["model"], doc["language"], doc["segments"]) == ("voxtral-mini-2507", "en", [])
    assert doc["text"]
    usage = doc["usage"]
    assert usage["prompt_audio_seconds"] == 12 and usage["prompt_tokens"] == 9
    # Audio tokens are in the total: billing from total_tokens would be wrong.
    assert usage["total_tokens"] > usage["prompt_tokens"] + usage["completion_tokens"]


def test_transcription_stream(mock_mistral, key):
    mock_mistral.behaviour(audio_seconds=30, stream_chunks=2)
    body, ctype = multipart({"model": "voxtral-mini-latest", "file_url": "https://x/a.mp3", "stream": "true"})
    status, headers, data = post(mock_mistral, "/v1/audio/transcriptions", body, key,
                                 headers={"Content-Type": ctype, "Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    events = sse(decoded(headers, data))
    names = [e for e, _ in events]
    assert names[-1] == "transcription.done" and names.count("transcription.text.delta") == 2
    done = json.loads(events[-1][1])
    assert done["type"] == "transcription.done" and done["usage"]["prompt_audio_seconds"] == 30


def test_transcription_wants_multipart_and_a_file(mock_mistral, key):
    status, _, data = post(mock_mistral, "/v1/audio/transcriptions", {"model": "voxtral-mini-latest"}, key)
    assert status == 422
    body, ctype = multipart({"model": "voxtral-mini-latest"})
    status, _, data = post(mock_mistral, "/v1/audio/transcriptions", body, key, headers={"Content-Type": ctype})
    assert status == 422 and json.loads(data)["detail"][0]["loc"] == ["body", "file"]


@pytest.mark.parametrize("path, body, results", [
    ("/v1/moderations", {"model": "mistral-moderation-latest", "inputs": ["a" * 8, "b" * 8]}, 2),
    ("/v1/chat/moderations", {"model": "mistral-moderation-latest",
                              "inputs": [{"role": "user", "content": "a" * 16}]}, 1),
    ("/v1/classifications", {"model": "ft:classifier", "inputs": "a" * 16}, 1),
    ("/v1/chat/classifications", {"model": "ft:classifier",
                                  "input": [{"messages": [{"role": "user", "content": "a" * 8}]},
                                            {"messages": [{"role": "user", "content": "b" * 8}]}]}, 2),
])
def test_moderation_and_classification_usage(mock_mistral, key, path, body, results):
    status, _, data = post(mock_mistral, path, body, key)
    assert status == 200, data
    doc = json.loads(data)
    assert doc["id"] and doc["model"] == body["model"] and len(doc["results"]) == results
    assert doc["usage"] == {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}


# --- management routes ---------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, body, expect", [
    ("GET", "/v1/models/mistral-small-latest", None,
     lambda d: d["id"] == "mistral-small-latest" and d["object"] == "model" and "capabilities" in d),
    ("DELETE", "/v1/models/ft:abc", None, lambda d: d == {"id": "ft:abc", "object": "model", "deleted": True}),
    ("GET", "/v1/files", None, lambda d: d == {"data": [], "object": "list", "total": 0}),
    ("GET", "/v1/batch/jobs", None, lambda d: d == {"data": [], "object": "list", "total": 0}),
    ("POST", "/v1/batch/jobs", {"endpoint": "/v1/chat/completions", "model": "mistral-small-latest",
                                "requests": [{"body": {"messages": []}}]},
     lambda d: d["id"].startswith("job_") and d["object"] == "batch" and d["status"] == "QUEUED"
     and d["total_requests"] == 1),
    ("GET", "/v1/webhooks", None, lambda d: d == []),
    ("GET", "/v1/service-accounts", None, lambda d: d == {"items": []}),
])
def test_management_routes_answer_and_are_recorded(mock_mistral, key, method, path, body, expect):
    status, _, data = call(mock_mistral, method, path, body, key=key)
    assert status == 200, data
    assert expect(json.loads(data))
    seen = last_request(mock_mistral)
    assert (seen["method"], seen["path"]) == (method, path)


def test_models_list_is_unchanged(mock_mistral, key):
    status, _, data = call(mock_mistral, "GET", "/v1/models", key=key)
    doc = json.loads(data)
    assert status == 200 and doc["object"] == "list"
    assert "mistral-small-latest" in [m["id"] for m in doc["data"]]


# --- routing like FastAPI/Starlette --------------------------------------------------------------

def test_percent_encoded_path_is_chat_completions(mock_mistral, key):
    status, _, data = post(mock_mistral, "/v1/%63hat/completions", CHAT, key)
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 10
    seen = last_request(mock_mistral)
    assert seen["path"] == "/v1/chat/completions" and seen["raw_path"] == "/v1/%63hat/completions"
    status, _, data = post(mock_mistral, "/v1/chat%2Fcompletions", CHAT, key)
    assert status == 200 and json.loads(data)["object"] == "chat.completion"


@pytest.mark.parametrize("path", ["/v1//chat/completions", "/v1/chat/completions/", "//v1/chat/completions",
                                  "/v1/chat/./completions", "/v1/Chat/completions", "/v1/chat/completions%20"])
def test_paths_are_not_normalised(mock_mistral, key, path):
    status, _, data = post(mock_mistral, path, CHAT, key)
    assert (status, json.loads(data)) == (404, {"detail": "Not Found"})
    assert last_request(mock_mistral)["raw_path"] == path


def test_the_query_string_never_changes_the_route(mock_mistral, key):
    status, _, data = post(mock_mistral, "/v1/chat/completions?path=/v1/embeddings&x=%2F", CHAT, key)
    assert status == 200 and json.loads(data)["object"] == "chat.completion"
    seen = last_request(mock_mistral)
    assert seen["path"] == "/v1/chat/completions" and seen["query"] == "path=/v1/embeddings&x=%2F"
    status, _, _ = call(mock_mistral, "GET", "/v1/models?", key=key)
    assert status == 200 and last_request(mock_mistral)["path"] == "/v1/models"


def test_unknown_route_and_wrong_method(mock_mistral, key):
    status, _, data = call(mock_mistral, "GET", "/v1/nothing/here", key=key)
    assert (status, json.loads(data)) == (404, {"detail": "Not Found"})
    status, headers, data = call(mock_mistral, "GET", "/v1/chat/completions", key=key)
    assert (status, json.loads(data)) == (405, {"detail": "Method Not Allowed"})
    assert headers["allow"] == "POST"
    status, headers, data = call(mock_mistral, "PUT", "/v1/models", key=key)
    assert (status, json.loads(data)) == (405, {"detail": "Method Not Allowed"})
    status, headers, data = call(mock_mistral, "HEAD", "/v1/models", key=key)
    assert status == 405 and data == b""  # FastAPI routes do not imply HEAD; no body on HEAD
    # The connection is still usable after a HEAD (no stray body): a fresh call works.
    assert call(mock_mistral, "GET", "/v1/models", key=key)[0] == 200


# --- request bodies ------------------------------------------------------------------------------

def raw_exchange(mock, request: bytes) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", mock.port), timeout=10) as sock:
        sock.sendall(request)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def test_chunked_request_body_with_trailers(mock_mistral, key):
    payload = json.dumps({**CHAT, "max_tokens": 6}).encode()
    a, b = payload[:17], payload[17:]
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: mistral\r\n"
           b"Authorization: Bearer " + key.encode() + b"\r\n"
           b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           + b"%x;ext=1\r\n%s\r\n" % (len(a), a) + b"%X\r\n%s\r\n" % (len(b), b)
           + b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n")
    status, _, data = raw_exchange(mock_mistral, req)
    assert status == 200, data
    assert json.loads(data)["usage"]["completion_tokens"] == 6
    seen = last_request(mock_mistral)
    assert seen["body"] == payload.decode()
    assert seen["headers"]["transfer-encoding"] == "chunked"
    assert seen["trailers"] == {"x-checksum": "abc", "x-other": "1"}


def test_chunked_request_body_keeps_the_connection_usable(mock_mistral, key):
    payload = json.dumps(CHAT).encode()
    one = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer " + key.encode()
           + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
    with socket.create_connection(("127.0.0.1", mock_mistral.port), timeout=10) as sock:
        for _ in range(2):  # two requests on one kept-alive connection
            sock.sendall(one)
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            assert resp.status == 200 and json.loads(resp.read())["object"] == "chat.completion"
    assert len(mock_mistral.requests()) == 2


def test_malformed_chunked_body_is_a_400(mock_mistral, key):
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer " + key.encode()
           + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
    status, _, _ = raw_exchange(mock_mistral, req)
    assert status == 400


# --- auth and the control API --------------------------------------------------------------------

@pytest.mark.parametrize("auth", [None, "Bearer " + "x" * 32, "Bearer  {key}", "{key}", "Bearer {key}x"])
def test_wrong_key_is_401(mock_mistral, key, auth):
    headers = {"Authorization": auth.format(key=key)} if auth else {}
    status, _, data = call(mock_mistral, "POST", "/v1/chat/completions", json.dumps(CHAT).encode(),
                           key=None, headers=headers)
    assert (status, json.loads(data)) == (401, {"detail": "Invalid API Key"})
    assert len(mock_mistral.requests()) == 1  # recorded even when refused


def test_unknown_path_without_key_is_401(mock_mistral):
    # Auth comes first (webhook tests rely on this): a non-API path without a key is refused.
    status, _, data = post(mock_mistral, "/hooks/anything", {"a": 1}, None)
    assert (status, json.loads(data)) == (401, {"detail": "Invalid API Key"})
    assert last_request(mock_mistral)["path"] == "/hooks/anything"


def test_control_api_over_http(mock_mistral, key):
    status, _, data = post(mock_mistral, "/__mock/behaviour", {"usage": {"prompt_tokens": 3, "completion_tokens": 4}},
                           None)
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 4
    doc = json.loads(post(mock_mistral, "/v1/chat/completions", CHAT, key)[2])
    assert (doc["usage"]["prompt_tokens"], doc["usage"]["completion_tokens"]) == (3, 4)
    seen = json.loads(call(mock_mistral, "GET", "/__mock/requests", key=None)[2])
    assert [r["path"] for r in seen] == ["/v1/chat/completions"]
    assert {"method", "path", "raw_path", "query", "headers", "body", "accept_encoding"} <= seen[0].keys()
    assert post(mock_mistral, "/__mock/reset", None, None)[0] == 200
    assert json.loads(call(mock_mistral, "GET", "/__mock/requests", key=None)[2]) == []


def test_abort_after_chunks_drops_the_stream(mock_mistral, key):
    mock_mistral.behaviour(stream_chunks=5, abort_after_chunks=2)
    conn = http.client.HTTPConnection("127.0.0.1", mock_mistral.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**CHAT, "stream": True}),
                 headers={"Authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead) as cut:
        resp.read()
    conn.close()
    events = [json.loads(d) for _, d in sse(cut.value.partial)]
    assert len(events) == 3 and not any("usage" in e for e in events)  # role chunk + 2 content chunks


# --- the official SDK parses every shape (it asks for gzip, deflate on every request) ----------

def test_the_python_sdk_reads_every_metered_shape(mock_mistral, key):
    from mistralai.client import Mistral

    client = Mistral(api_key=key, server_url=mock_mistral.url, timeout_ms=10_000)
    chat = client.chat.complete(model="mistral-small-latest", max_tokens=4, n=2,
                                messages=[{"role": "user", "content": "hi"}])
    assert len(chat.choices) == 2 and chat.usage.completion_tokens == 8
    streamed = [e.data.usage for e in client.chat.stream(model="mistral-small-latest", max_tokens=4, n=2,
                                                         messages=[{"role": "user", "content": "hi"}])]
    assert [u.completion_tokens for u in streamed if u] == [8]
    response = client.responses.create(model="mistral-small-latest", input="hi", max_output_tokens=4)
    # An incomplete usage object would silently parse as Unset in the SDK.
    assert (response.usage.input_tokens, response.usage.output_tokens) == (1, 4)
    assert client.responses.count_input_tokens(model="m", input="hello").input_tokens == 2
    conv = client.beta.conversations.start(model="mistral-small-latest", inputs="hello",
                                           completion_args={"max_tokens": 3})
    assert conv.usage.completion_tokens == 3
    done = [e.data for e in client.beta.conversations.start_stream(model="mistral-small-latest", inputs="x")
            if e.event == "conversation.response.done"]
    assert done[0].usage.completion_tokens == 16
    ocr = client.ocr.process(model="mistral-ocr-latest", pages=[0, 1],
                             document={"type": "document_url", "document_url": "https://x/y.pdf"})
    assert ocr.usage_info.pages_processed == 2
    audio = [e.data for e in client.audio.transcriptions.stream(model="voxtral-mini-latest",
                                                                file_url="https://x/a.mp3")
             if e.event == "transcription.done"]
    assert audio[0].usage.prompt_audio_seconds == 12
    assert len(client.classifiers.moderate(model="mistral-moderation-latest", inputs=["a", "b"]).results) == 2
    seen = mock_mistral.requests()
    assert all(r["accept_encoding"] == "gzip, deflate" and r["response_encoding"] == "gzip" for r in seen)
