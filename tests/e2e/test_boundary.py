"""The enforcement boundary, tried as a hostile client would: every way a request can reach the
upstream (any route, encoding, framing, path spelling, early end) is judged and charged, or
refused before anything is sent. A real Envoy runs envoy/demo.yaml; the mock upstream compresses
when asked, honours `n`, serves every route of the table and routes percent-encoded paths the
way the real (FastAPI) server does."""

from __future__ import annotations

import gzip
import json
import math
import socket
import time

import pytest
import yaml

import harness
from deployment import Deployment, error_code, request
from deployment import token_stat as stat, wait_token_stat as wait_stat

SMALL_IN, SMALL_OUT = 150, 600  # nano-USD per token, mistral-small-latest


def cost(prompt, completion):
    return prompt * SMALL_IN + completion * SMALL_OUT


@pytest.fixture(scope="module")
def dep(tmp_path_factory, mock_mistral, mock_keys):
    d = Deployment(tmp_path_factory.mktemp("boundary"), mock_mistral, mock_keys)
    d.mint("plain", "prod")
    d.mint("capped", "prod", "--max-tokens", "100", "--budget-usd", "1", "--budget-window", "daily")
    d.mint("budget", "prod", "--budget-usd", "0.01", "--budget-window", "lifetime")
    d.mint("small", "prod", "--budget-usd", "0.004", "--budget-window", "lifetime")
    d.mint("meter", "prod", "--budget-usd", "10", "--budget-window", "lifetime")
    d.mint("audio", "prod", "--budget-usd", "10", "--budget-window", "lifetime",
           "--allow-unmetered", "true")
    d.mint("ops", "prod", "--scopes", "read,manage")
    d.mint("picky", "prod", "--models", "mistral-small-*")
    d.mint("reader", "prod", "--scopes", "inference,read")
    d.mint("all", "prod", "--scopes", "all")
    d.start()
    yield d
    d.stop()



def spend(dep, token) -> int:
    return stat(dep, token, "spend_nano_usd")


def upstream_paths(mock) -> list[str]:
    return [r["path"] for r in mock.requests()]


def test_the_official_sdk_against_a_compressing_upstream_is_charged_exactly(dep, mock_mistral):
    from mistralai.client import Mistral

    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 500})
    before = spend(dep, "meter")
    client = Mistral(api_key=dep.tokens["meter"], server_url=dep.url, timeout_ms=30_000)
    res = client.chat.complete(model="mistral-small-latest", max_tokens=500,
                               messages=[{"role": "user", "content": "hi"}])
    assert res.usage.completion_tokens == 500
    assert wait_stat(dep, "meter", "spend_nano_usd", before + cost(1000, 500)) == before + cost(1000, 500)
    seen = mock_mistral.requests()[-1]
    # The SDK asked for gzip; ShieldKey asked the upstream for identity so it could read usage.
    assert seen["accept_encoding"] == "identity" and seen["response_encoding"] is None


def test_a_response_the_filter_cannot_read_is_charged_its_reservation(dep, mock_mistral):
    """An upstream that compresses although asked for identity: charged the worst case, counted."""
    mock_mistral.behaviour(usage={"prompt_tokens": 10, "completion_tokens": 10},
                           force_encoding="gzip")
    body = {"model": "mistral-small-latest", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}]}
    before = spend(dep, "meter")
    status, headers, raw = request(dep.url, token=dep.tokens["meter"], body=body)
    assert status == 200 and headers.get("content-encoding") == "gzip"
    assert json.loads(gzip.decompress(raw))["usage"]["completion_tokens"] == 10
    payload = len(json.dumps(body).encode())
    reservation = math.ceil((payload * SMALL_IN + 100 * SMALL_OUT) * 1.75)
    assert wait_stat(dep, "meter", "spend_nano_usd", before + reservation) == before + reservation
    assert dep.envoy.stat("wasmcustom.shieldkey.unreadable_responses") >= 1


def h2_request(url: str, token: str, body: bytes | None, *, method: str = "POST",
               path: str = "/v1/chat/completions", trailers: bool = False,
               headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One HTTP/2 (prior knowledge) request. With `trailers`, the body goes as two DATA frames
    without END_STREAM and the stream ends with trailers: the framing that used to skip judging."""
    import h2.config
    import h2.connection
    import h2.events

    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", method), (":path", path), (":scheme", "http"),
                            (":authority", "shieldkey"), ("authorization", f"Bearer {token}"),
                            ("content-type", "application/json"), *(headers or {}).items()],
                      end_stream=body is None)
    if body is not None:
        half = len(body) // 2
        conn.send_data(sid, body[:half])
        if trailers:
            conn.send_data(sid, body[half:])
            conn.send_headers(sid, [("x-trailer", "1")], end_stream=True)
        else:
            conn.send_data(sid, body[half:], end_stream=True)
    sock.sendall(conn.data_to_send())
    status, got, data, done = 0, {}, b"", False
    while not done:
        chunk = sock.recv(65536)
        if not chunk:
            break
        for event in conn.receive_data(chunk):
            if isinstance(event, h2.events.ResponseReceived):
                got = {k.decode(): v.decode() for k, v in event.headers}
                status = int(got[":status"])
            elif isinstance(event, h2.events.DataReceived):
                data += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                done = True
        sock.sendall(conn.data_to_send())
    sock.close()
    return status, got, data


def test_http2_request_trailers_do_not_skip_the_body_rules(dep, mock_mistral):
    greedy = json.dumps({"model": "mistral-small-latest", "max_tokens": 4000,
                         "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, body = h2_request(dep.url, dep.tokens["capped"], greedy, trailers=True)
    assert status == 400 and error_code(body) == "shield_max_tokens_exceeded"
    assert mock_mistral.requests() == []
    fine = json.dumps({"model": "mistral-small-latest", "max_tokens": 100,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    before = spend(dep, "capped")
    status, _, body = h2_request(dep.url, dep.tokens["capped"], fine, trailers=True)
    assert status == 200, body
    usage = json.loads(body)["usage"]
    want = before + cost(usage["prompt_tokens"], usage["completion_tokens"])
    assert wait_stat(dep, "capped", "spend_nano_usd", want) == want


def test_http1_chunked_body_with_trailers_is_judged(dep, mock_mistral):
    greedy = json.dumps({"model": "mistral-small-latest", "max_tokens": 4000,
                         "messages": [{"role": "user", "content": "hi"}]}).encode()
    host, port = dep.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        head = ("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                f"authorization: Bearer {dep.tokens['capped']}\r\ntransfer-encoding: chunked\r\n"
                "trailer: x-trailer\r\n\r\n").encode()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (greedy[:10], greedy[10:]))
        s.sendall(head + chunks + b"0\r\nx-trailer: 1\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    assert got.startswith(b"HTTP/1.1 400"), got[:200]
    assert b"shield_max_tokens_exceeded" in got
    assert mock_mistral.requests() == []


@pytest.mark.parametrize("method,path,token", [
    ("DELETE", "/v1/models/ft:mistral-small:acme", "plain"),
    ("GET", "/v1/files", "plain"),
    ("GET", "/v1/webhooks/w1/signing-secret", "plain"),
    ("POST", "/v1/service-accounts", "plain"),
    ("POST", "/v1/batch/jobs", "plain"),
    ("GET", "/v1/no-such-route", "plain"),
    ("POST", "/v1/chat/completions", "ops"),
    ("GET", "/v1/no-such-route", "ops"),
])
def test_routes_outside_the_token_scopes_are_refused(dep, mock_mistral, method, path, token):
    body = b"{}" if method == "POST" else None
    status, _, raw = request(dep.url, path, token=dep.tokens[token], method=method, body=body)
    assert status == 403 and error_code(raw) == "shield_route_denied", raw
    assert mock_mistral.requests() == []


def test_scopes_open_what_they_name(dep, mock_mistral):
    assert request(dep.url, "/v1/files", token=dep.tokens["ops"], method="GET")[0] == 200
    assert request(dep.url, "/v1/models/m1", token=dep.tokens["ops"], method="DELETE")[0] == 200
    # `all` also reaches routes ShieldKey does not know (the mock answers 404 for them).
    assert request(dep.url, "/v1/no-such-route", token=dep.tokens["all"], method="GET")[0] == 404
    assert upstream_paths(mock_mistral) == ["/v1/files", "/v1/models/m1", "/v1/no-such-route"]


def test_a_budgeted_token_cannot_reach_routes_it_cannot_meter(dep, mock_mistral):
    dep.cli("limit", "budget", "--scopes", "all", "--publish", str(dep.ecds), "--wasm",
            str(harness.PROJECT / "target" / "wasm32-wasip1" / "release" / "shieldkey.wasm"))
    dep.wait_for_config_version(dep.revision())
    status, _, raw = request(dep.url, "/v1/batch/jobs", token=dep.tokens["budget"],
                             body={"input_files": [], "endpoint": "/v1/chat/completions"})
    assert status == 403 and error_code(raw) == "shield_route_unmetered"
    assert mock_mistral.requests() == []


CHAT_BODY = {"model": "mistral-small-latest", "max_tokens": 20,
             "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("token,tool,code", [
    # Billed per call beyond `usage`: not for a budgeted token without allow_unmetered.
    ("meter", {"type": "web_search"}, "shield_tool_unmetered"),
    ("capped", {"type": "image_generation"}, "shield_tool_unmetered"),
    # Reaching the workspace: its libraries need `read`, its connectors `manage`.
    ("plain", {"type": "document_library", "library_ids": ["lib_1"]}, "shield_tool_denied"),
    ("reader", {"type": "connector", "connector_id": "c_1"}, "shield_tool_denied"),
    ("plain", {"type": "some_future_tool"}, "shield_tool_denied"),
])
def test_tools_the_upstream_runs_are_judged_before_anything_is_sent(dep, mock_mistral, token, tool, code):
    function = {"type": "function", "function": {"name": "f", "parameters": {}}}
    body = dict(CHAT_BODY, tools=[function, tool])
    status, _, raw = request(dep.url, token=dep.tokens[token], body=body)
    assert status == 403 and error_code(raw) == code, raw
    # Also on conversations, where `tools` is as much the request's.
    conversation = {"model": "mistral-small-latest", "inputs": "hi", "tools": [tool],
                    "completion_args": {"max_tokens": 20}}
    status, _, raw = request(dep.url, "/v1/conversations", token=dep.tokens[token], body=conversation)
    assert status == 403 and error_code(raw) == code, raw
    assert mock_mistral.requests() == []


def test_tools_within_the_scopes_of_an_unmetered_token_pass(dep, mock_mistral):
    for token, tool in [("plain", {"type": "web_search"}),
                        ("reader", {"type": "document_library", "library_ids": ["lib_1"]}),
                        ("meter", {"type": "function", "function": {"name": "f", "parameters": {}}})]:
        status, _, raw = request(dep.url, token=dep.tokens[token], body=dict(CHAT_BODY, tools=[tool]))
        assert status == 200, (token, raw)
    assert len(mock_mistral.requests()) == 3


def test_a_model_the_body_does_not_choose_cannot_pass_a_model_rule(dep, mock_mistral):
    """An agent's model, or a stored conversation's, is what runs: a `model` next to it is a decoy."""
    mock_mistral.behaviour(agent_model="mistral-large-latest", conversation_model="mistral-large-latest")
    decoys = [
        ("/v1/agents/completions", {"agent_id": "ag_1", "model": "mistral-small-latest", "max_tokens": 20,
                                    "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/conversations", {"agent_id": "ag_1", "model": "mistral-small-latest", "inputs": "hi"}),
        ("/v1/conversations/conv_1", {"model": "mistral-small-latest", "inputs": "more"}),
    ]
    for path, body in decoys:
        status, _, raw = request(dep.url, path, token=dep.tokens["picky"], body=body)
        assert status == 403 and error_code(raw) == "shield_model_denied", (path, raw)
    # Audio and speech bodies are not read: a model rule cannot be judged there.
    status, _, raw = request(dep.url, "/v1/audio/speech", token=dep.tokens["picky"],
                             body={"model": "voxtral-mini-tts-latest", "input": "hi"})
    assert status == 403 and error_code(raw) == "shield_route_unmetered", raw
    assert mock_mistral.requests() == []
    # The same token choosing its model in the body passes.
    status, _, raw = request(dep.url, "/v1/conversations", token=dep.tokens["picky"],
                             body={"model": "mistral-small-latest", "inputs": "hi"})
    assert status == 200, raw


def test_a_client_cannot_make_envoy_retry_what_mistral_bills(dep, mock_mistral):
    """Envoy's x-envoy-* request headers are honoured only from internal addresses (none are,
    in the shipped configs): a client asking for retries of a successful response would have
    Mistral bill every try while the filter charges the one response it sees."""
    retry = {"x-envoy-retry-on": "5xx,retriable-status-codes", "x-envoy-retriable-status-codes": "200",
             "x-envoy-max-retries": "3", "x-envoy-upstream-rq-per-try-timeout-ms": "1"}
    status, _, raw = request(dep.url, token=dep.tokens["meter"], body=CHAT_BODY, headers=retry)
    assert status == 200, raw
    seen = mock_mistral.requests()
    assert len(seen) == 1
    assert not [h for h in seen[0]["headers"] if h.startswith("x-envoy-retr")], seen[0]["headers"]


def test_max_tokens_zero_is_no_cap_under_a_ceiling(dep, mock_mistral):
    status, _, raw = request(dep.url, token=dep.tokens["capped"], body=dict(CHAT_BODY, max_tokens=0))
    assert status == 400 and error_code(raw) == "shield_max_tokens_exceeded", raw
    assert mock_mistral.requests() == []


@pytest.mark.parametrize("path", ["/v1/%63hat/completions", "/v1//chat/completions",
                                  "/v1/./chat/completions", "/v1/x/../chat/completions"])
def test_path_spellings_cannot_skip_the_ceiling(dep, mock_mistral, path):
    greedy = {"model": "mistral-small-latest", "max_tokens": 4000,
              "messages": [{"role": "user", "content": "hi"}]}
    host, port = dep.url.removeprefix("http://").split(":")
    payload = json.dumps(greedy).encode()
    # Raw socket: urllib would normalise some of these spellings itself.
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  f"authorization: Bearer {dep.tokens['capped']}\r\ncontent-length: {len(payload)}\r\n"
                  "connection: close\r\n\r\n".encode() + payload)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
    status = int(got.split(b" ", 2)[1])
    # Envoy normalises the path (then the filter judges chat completions), or refuses it.
    assert status == 400, got[:300]
    assert b"shield_max_tokens_exceeded" in got or b"shield_path_not_canonical" in got
    assert mock_mistral.requests() == []


def test_n_choices_count_against_the_budget(dep, mock_mistral):
    # 20 × 1000 completion tokens of mistral-small cost $0.012: more than the $0.01 budget.
    body = {"model": "mistral-small-latest", "max_tokens": 1000, "n": 20,
            "messages": [{"role": "user", "content": "hi"}]}
    status, _, raw = request(dep.url, token=dep.tokens["budget"], body=body)
    assert status == 429 and error_code(raw) == "shield_budget_exceeded"
    assert mock_mistral.requests() == []
    body["n"] = 2
    status, _, raw = request(dep.url, token=dep.tokens["budget"], body=body)
    assert status == 200
    usage = json.loads(raw)["usage"]
    assert len(json.loads(raw)["choices"]) == 2
    assert wait_stat(dep, "budget", "spend_nano_usd", cost(usage["prompt_tokens"], usage["completion_tokens"])) \
        == cost(usage["prompt_tokens"], usage["completion_tokens"])


def test_conversations_are_capped_by_completion_args(dep, mock_mistral):
    top_level = {"model": "mistral-small-latest", "inputs": "hi", "max_tokens": 10}
    status, _, raw = request(dep.url, "/v1/conversations", token=dep.tokens["capped"], body=top_level)
    assert status == 400 and error_code(raw) == "shield_max_tokens_exceeded"
    ok = {"model": "mistral-small-latest", "inputs": "hi", "completion_args": {"max_tokens": 50}}
    before = spend(dep, "capped")
    status, _, raw = request(dep.url, "/v1/conversations", token=dep.tokens["capped"], body=ok)
    assert status == 200, raw
    usage = json.loads(raw)["usage"]
    want = before + cost(usage["prompt_tokens"], usage["completion_tokens"])
    assert wait_stat(dep, "capped", "spend_nano_usd", want) == want


ROUTES = [
    # (path, body, how the response reports what it cost)
    ("/v1/chat/completions", {"model": "mistral-small-latest", "max_tokens": 20,
                              "messages": [{"role": "user", "content": "hello there"}]}, "tokens"),
    ("/v1/fim/completions", {"model": "mistral-small-latest", "max_tokens": 20, "prompt": "def f("}, "tokens"),
    ("/v1/embeddings", {"model": "mistral-small-latest", "input": ["abc", "def"]}, "tokens"),
    ("/v1/moderations", {"model": "mistral-small-latest", "input": ["abc"]}, "tokens"),
    ("/v1/chat/moderations", {"model": "mistral-small-latest",
                              "input": [{"role": "user", "content": "abc"}]}, "tokens"),
    ("/v1/classifications", {"model": "mistral-small-latest", "input": ["abc"]}, "tokens"),
    ("/v1/chat/classifications", {"model": "mistral-small-latest",
                                  "input": [{"messages": [{"role": "user", "content": "x"}]}]}, "tokens"),
    ("/v1/conversations", {"model": "mistral-small-latest", "inputs": "hi",
                           "completion_args": {"max_tokens": 20}}, "tokens"),
    ("/v1/conversations/conv_1", {"inputs": "more", "completion_args": {"max_tokens": 20}}, "tokens"),
    ("/v1/conversations/conv_1/restart", {"inputs": "again", "from_entry_id": "e1",
                                          "completion_args": {"max_tokens": 20}}, "tokens"),
    ("/v1/responses", {"model": "mistral-small-latest", "input": "hi", "max_output_tokens": 20}, "responses"),
    ("/v1/agents/completions", {"agent_id": "ag_1", "max_tokens": 20,
                                "messages": [{"role": "user", "content": "hi"}]}, "tokens"),
    ("/v1/ocr", {"model": "mistral-ocr-latest", "pages": [0, 1],
                 "document": {"type": "document_url", "document_url": "https://x/y.pdf"}}, "pages"),
]


@pytest.mark.parametrize("path,body,unit", ROUTES, ids=[r[0] for r in ROUTES])
def test_every_inference_route_is_metered_as_the_table_says(dep, mock_mistral, path, body, unit):
    mock_mistral.behaviour(conversation_model="mistral-small-latest", agent_model="mistral-small-latest")
    before = spend(dep, "meter")
    status, _, raw = request(dep.url, path, token=dep.tokens["meter"], body=body)
    assert status == 200, raw
    doc = json.loads(raw)
    if unit == "tokens":
        want = cost(doc["usage"]["prompt_tokens"], doc["usage"]["completion_tokens"])
    elif unit == "responses":
        want = cost(doc["usage"]["input_tokens"], doc["usage"]["output_tokens"])
    else:
        want = doc["usage_info"]["pages_processed"] * 4_000_000  # $4 per 1000 pages
    assert want > 0
    assert wait_stat(dep, "meter", "spend_nano_usd", before + want) == before + want
    assert mock_mistral.requests()[-1]["headers"]["authorization"] == f"Bearer {dep.keys['prod']}"


def test_audio_is_metered_by_the_second_when_the_policy_allows_it(dep, mock_mistral):
    mock_mistral.behaviour(audio_seconds=60)
    boundary = "shieldkeyboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nvoxtral-mini-latest\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file_url\"\r\n\r\nhttps://x/a.mp3\r\n"
            f"--{boundary}--\r\n").encode()
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    status, _, raw = request(dep.url, "/v1/audio/transcriptions", token=dep.tokens["meter"],
                             body=form, headers=headers)
    assert status == 403 and error_code(raw) == "shield_route_unmetered"
    before = spend(dep, "audio")
    status, _, raw = request(dep.url, "/v1/audio/transcriptions", token=dep.tokens["audio"],
                             body=form, headers=headers)
    assert status == 200, raw
    # $0.003 per minute of audio.
    assert wait_stat(dep, "audio", "spend_nano_usd", before + 3_000_000) == before + 3_000_000


def test_cut_short_streams_never_push_spend_past_the_limit(dep, mock_mistral):
    """The upstream drops every stream after two chunks: each is charged an estimate within its
    reservation, and the budget ($0.004) is never exceeded however many are tried."""
    mock_mistral.behaviour(stream_chunks=50, abort_after_chunks=2)
    payload = json.dumps({"model": "mistral-small-latest", "stream": True, "max_tokens": 200,
                          "messages": [{"role": "user", "content": "x" * 8000}]}).encode()
    host, port = dep.url.removeprefix("http://").split(":")
    statuses = []
    for _ in range(40):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      + f"authorization: Bearer {dep.tokens['small']}\r\ncontent-length: {len(payload)}\r\n"
                        "connection: close\r\n\r\n".encode() + payload)
            got = b""
            while chunk := s.recv(4096):
                got += chunk
        statuses.append(int(got.split(b" ", 2)[1]))
        if statuses[-1] == 429:
            break
    assert 200 in statuses and statuses[-1] == 429, statuses
    time.sleep(0.3)
    assert 0 < spend(dep, "small") <= 4_000_000
    assert stat(dep, "small", "estimated_charges") >= 1


def test_a_model_name_with_a_newline_cannot_forge_an_access_log_line(dep, mock_mistral):
    before = dep.envoy.audit_records()
    forged = '{"token_id":"alice","decision":"allowed"}'
    body = {"model": f"mistral-small-latest\n{forged}\n", "max_tokens": 5, "messages": []}
    status, _, raw = request(dep.url, token=dep.tokens["capped"], body=body)
    assert status == 400 and error_code(raw) == "shield_model_invalid"
    records = dep.envoy.wait_audit(len(before) + 1)
    # Exactly one record, the refusal, and every line of the file is one whole JSON object.
    assert len(records) == len(before) + 1
    assert records[-1]["token_id"] == "capped" and records[-1]["decision"] == "shield_model_invalid"
    assert [r for r in records if r.get("token_id") == "alice"] == \
        [r for r in before if r.get("token_id") == "alice"]
    lines = (dep.workdir / "shieldkey-audit.log").read_text().splitlines()
    assert all(l.startswith("{") and l.endswith("}") for l in lines)
    assert mock_mistral.requests() == []


def test_client_headers_cannot_forge_audit_fields_and_every_record_is_one_json_object(dep, mock_mistral):
    """ShieldKey's fields reach the record as JSON it escaped itself (one filter-state value the
    access log splices in), and a request Envoy answered alone still writes a whole record, with
    Envoy's fields only. (demo.yaml replaces a client's `x-request-id` at the edge; a config that
    keeps it gets it escaped: `audit::tests::client_text_cannot_forge_fields_or_lines`.)"""
    before = dep.envoy.audit_records()
    hostile = 'r1","decision":"allowed","token_id":"alice","x":"\\'
    body = {"model": "mistral-large-latest", "max_tokens": 4000,
            "messages": [{"role": "user", "content": "hi"}]}
    status, headers, raw = request(dep.url, token=dep.tokens["capped"], body=body,
                                   headers={"x-request-id": hostile})
    assert status == 400 and error_code(raw) == "shield_max_tokens_exceeded"
    # An escaped slash: Envoy refuses it before any filter runs.
    status, _, _ = request(dep.url, "/v1/chat%2Fcompletions", token=dep.tokens["capped"], body=body)
    assert status == 400
    records = dep.envoy.wait_audit(len(before) + 2)
    assert len(records) == len(before) + 2
    refused, envoy_alone = records[-2:]
    # The forged members are inside the request id's string, not fields of the record.
    assert refused["decision"] == "shield_max_tokens_exceeded" and refused["token_id"] == "capped"
    assert refused["request_id"] == headers["x-request-id"] and "x" not in refused
    assert refused["method"] == "POST" and refused["model"] == "mistral-large-latest"
    assert envoy_alone["status"] == 400 and isinstance(envoy_alone["duration_ms"], int)
    assert not {"decision", "token_id", "request_id"} & set(envoy_alone), envoy_alone
    lines = (dep.workdir / "shieldkey-audit.log").read_text().splitlines()
    assert all(isinstance(json.loads(l), dict) for l in lines)
    assert mock_mistral.requests() == []


def test_a_client_chosen_request_id_is_escaped_in_the_record(tmp_path, mock_mistral, mock_keys):
    """An Envoy that keeps the client's x-request-id (demo.yaml with
    `preserve_external_request_id`): quotes, a backslash and a UTF-8 line separator in it stay
    inside the record's string, as printable ASCII, and the record's real fields stand."""
    doc = yaml.safe_load((harness.PROJECT / "envoy" / "demo.yaml").read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["preserve_external_request_id"] = True
    config = tmp_path / "keeps-request-ids.yaml"
    config.write_text(yaml.safe_dump(doc))
    d = Deployment(tmp_path / "dep", mock_mistral, mock_keys, bootstrap=str(config))
    d.mint("alice", "prod")
    d.start()
    try:
        hostile = b'r1","decision":"allowed","token_id":"mallory","x":"\\ \xe2\x80\xa8 end'
        payload = json.dumps({"model": "mistral-small-latest", "max_tokens": 5,
                              "messages": [{"role": "user", "content": "hi"}]}).encode()
        host, port = d.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                      b"content-type: application/json\r\nconnection: close\r\n"
                      + f"authorization: Bearer {d.tokens['alice']}\r\n".encode()
                      + b"x-request-id: " + hostile + b"\r\n"
                      + f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        assert got.startswith(b"HTTP/1.1 200"), got[:300]
        [record] = d.envoy.wait_audit(1)
        assert record["request_id"] == hostile.decode()
        assert record["token_id"] == "alice" and record["decision"] == "allowed"
        assert "x" not in record
        line = (d.workdir / "shieldkey-audit.log").read_bytes().splitlines()[0]
        assert all(32 <= b < 127 for b in line), line
    finally:
        d.stop()


def test_clients_that_go_away_leave_whole_records(dep, mock_mistral):
    """A client gone before its body was complete (not decided: what ShieldKey knew, decision
    null) and one gone mid-stream (allowed, charged an estimate): each one whole JSON record."""
    before = dep.envoy.audit_records()
    payload = json.dumps({"model": "mistral-small-latest", "max_tokens": 20, "stream": True,
                          "messages": [{"role": "user", "content": "hello"}]}).encode()
    head = ("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {dep.tokens['capped']}\r\ncontent-length: {len(payload)}\r\n\r\n")
    host, port = dep.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode() + payload[:10])
        time.sleep(0.3)
    mock_mistral.behaviour(stream_chunks=50, chunk_delay_ms=50)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(head.encode() + payload)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        time.sleep(0.5)
        mock_mistral.reset()
    records = dep.envoy.wait_audit(len(before) + 2)
    assert len(records) == len(before) + 2, records[len(before):]
    undecided = next(r for r in records[len(before):] if r["decision"] is None)
    assert undecided["token_id"] == "capped" and undecided["method"] == "POST", undecided
    assert undecided["cost_nano_usd"] is None and undecided["request_id"], undecided
    assert isinstance(undecided["status"], int) and isinstance(undecided["duration_ms"], int)
    cut = next(r for r in records[len(before):] if r["decision"] is not None)
    assert cut["decision"] == "allowed" and cut["cost_estimated"] == "true", cut


STREAMS = [
    ("/v1/chat/completions", {"model": "mistral-small-latest", "max_tokens": 20, "stream": True,
                              "messages": [{"role": "user", "content": "hello"}]}),
    ("/v1/conversations", {"model": "mistral-small-latest", "inputs": "hi", "stream": True,
                           "completion_args": {"max_tokens": 20}}),
    ("/v1/responses", {"model": "mistral-small-latest", "input": "hi", "stream": True,
                       "max_output_tokens": 20}),
]


def sse_usage(raw: bytes) -> dict:
    """The usage of the last event that carried one, read the way a client would."""
    usage = None
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            doc = json.loads(line[6:])
            usage = doc.get("usage") or doc.get("response", {}).get("usage") or usage
    assert usage, raw[-400:]
    return usage


@pytest.mark.parametrize("path,body", STREAMS, ids=[s[0] for s in STREAMS])
def test_streamed_routes_are_charged_exactly(dep, mock_mistral, path, body):
    before = spend(dep, "meter")
    status, headers, raw = request(dep.url, path, token=dep.tokens["meter"], body=body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    usage = sse_usage(raw)
    want = before + cost(usage.get("prompt_tokens", usage.get("input_tokens")),
                         usage.get("completion_tokens", usage.get("output_tokens")))
    assert wait_stat(dep, "meter", "spend_nano_usd", want) == want


def test_http2_clients_meet_the_same_boundary(dep, mock_mistral):
    """The same refusals and exact charges over HTTP/2 (prior knowledge)."""
    token = dep.tokens["capped"]
    greedy = json.dumps({"model": "mistral-small-latest", "max_tokens": 4000, "messages": []}).encode()
    status, _, body = h2_request(dep.url, token, greedy)
    assert status == 400 and error_code(body) == "shield_max_tokens_exceeded"
    status, _, body = h2_request(dep.url, token, None, method="DELETE", path="/v1/models/ft:x")
    assert status == 403 and error_code(body) == "shield_route_denied"
    status, _, body = h2_request(dep.url, token, greedy, path="/v1/%63hat/completions")
    assert status == 400
    assert mock_mistral.requests() == []
    before = spend(dep, "capped")
    fine = json.dumps({"model": "mistral-small-latest", "max_tokens": 50,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, headers, body = h2_request(dep.url, token, fine, headers={"accept-encoding": "gzip"})
    assert status == 200
    # Envoy's compressor gzips for the client after ShieldKey read the plain response.
    assert headers.get("content-encoding") == "gzip"
    usage = json.loads(gzip.decompress(body))["usage"]
    want = before + cost(usage["prompt_tokens"], usage["completion_tokens"])
    assert wait_stat(dep, "capped", "spend_nano_usd", want) == want
