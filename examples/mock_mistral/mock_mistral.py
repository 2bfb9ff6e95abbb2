#!/usr/bin/env python3
"""A faithful mock of the Mistral API for ShieldKey's demo and tests (Python stdlib only).

It is meant to be as strict and as hostile as the real API: a kinder mock hides billing bugs in the
filter in front of it. Shapes follow recorded api.mistral.ai traffic and the official SDKs
(`mistralai` 3.7.0 models; see the README).

Inference endpoints (all need `Authorization: Bearer <one of the --key values>`):
  POST /v1/chat/completions      non-stream JSON, or SSE with `stream: true`: `data: {...}` chunks with
                                 the `p` padding field, usage on the chunk with finish_reason, then
                                 `data: [DONE]`. `n` choices (index 0..n-1): completion_tokens is the
                                 sum over choices; a stream sends one chunk sequence per choice (role
                                 chunk, `stream_chunks` content chunks, the last with finish_reason)
                                 and usage rides on the final chunk of the last choice only.
                                 `n` and `max_tokens` are validated like pydantic (lax ints: 3, 3.0,
                                 "3" are 3); n < 1 or a non-integer is a FastAPI 422. `stream` is a
                                 lax bool everywhere (true, "true", 1; "false" does not stream).
  POST /v1/fim/completions       same shapes as chat
  POST /v1/agents/completions    same shapes as chat; the request names an `agent_id` instead of a
                                 model, the response carries the agent's model (behaviour
                                 `agent_model`, default mistral-medium-latest)
  POST /v1/embeddings            usage with completion_tokens 0
  POST /v1/responses             OpenAI Responses shape: {"id":"resp_..","object":"response",
                                 "status":"completed","model",..,"output":[{"type":"message",
                                 "role":"assistant","content":[{"type":"output_text","text":..}]}],
                                 "usage":{"input_tokens":N,"output_tokens":M,"total_tokens":N+M,..}};
                                 M = min(max_output_tokens, 16); prompt from `instructions` + `input`
                                 (string or list of messages). `stream: true`: SSE `event:`/`data:`
                                 pairs: response.created, response.output_text.delta (x stream_chunks),
                                 response.completed whose data is {"type":"response.completed",
                                 "response":{... "usage":{...}}}; no [DONE]
  POST /v1/responses/input_tokens {"object":"response.input_tokens","input_tokens":N} (no usage)
  POST /v1/conversations         start: `inputs` (string or entries) and `model` or `agent_id`;
  POST /v1/conversations/{id}    append (the model is the conversation's, else `conversation_model`)
  POST /v1/conversations/{id}/restart
                                 {"object":"conversation.response","conversation_id":"conv_..",
                                 "outputs":[{"object":"entry","type":"message.output","role":
                                 "assistant","content":..,"model":..}],"usage":{"prompt_tokens",
                                 "completion_tokens","total_tokens","connector_tokens":null}};
                                 completion_tokens = min(completion_args.max_tokens, 16) (a top-level
                                 `max_tokens` is ignored, as Mistral does). `stream: true`: events
                                 conversation.response.started, message.output.delta (x
                                 stream_chunks), conversation.response.done with {"type":
                                 "conversation.response.done","usage":{...}}; no [DONE]
  GET  /v1/conversations         [] ; GET /v1/conversations/{id} (a conversation object);
  DELETE /v1/conversations/{id}  204
  POST /v1/ocr                   {"pages":[{"index":i,"markdown":..,"images":[],"dimensions":..}],
                                 "model":"mistral-ocr-2505","usage_info":{"pages_processed":P,
                                 "doc_size_bytes":1234}}; P = the number of pages asked for (`pages`
                                 as a list or a string like "0,2-4") else behaviour `ocr_pages`
                                 (default 3); model: behaviour `ocr_model`; doc_size_bytes: behaviour
                                 `ocr_doc_size_bytes`
  POST /v1/audio/transcriptions  a form, multipart/form-data or urlencoded (httpx sends that when
                                 there is no file) (`model`, `file` | `file_url` | `file_id`,
                                 `stream`, `language`): {"model":"voxtral-mini-2507","text":..,
                                 "language":"en","segments":[],"usage":{"prompt_audio_seconds":S,
                                 "prompt_tokens":9,"completion_tokens":C,"total_tokens":9+A+C}}
                                 with S = behaviour `audio_seconds` (default 12), A = round(12.5*S)
                                 audio tokens (so total != prompt + completion, as for real), C =
                                 16; model: behaviour `transcription_model`. `stream=true`: events
                                 transcription.language, transcription.text.delta (x stream_chunks),
                                 transcription.done (carries usage); no [DONE]
  POST /v1/moderations, /v1/chat/moderations, /v1/classifications, /v1/chat/classifications
                                 {"id","model","results":[one per input],"usage":{"prompt_tokens":N,
                                 "completion_tokens":0,"total_tokens":N}}
  GET  /v1/models ; GET /v1/models/{id} (model card) ; DELETE /v1/models/{id} ({"id","object":
       "model","deleted":true})
Management endpoints (they exist so tests can prove the filter refuses them; recorded like all):
  GET /v1/files ({"data":[],"object":"list","total":0}), POST /v1/files (a file object),
  GET /v1/batch/jobs ({"data":[],"object":"list","total":0}), POST /v1/batch/jobs (a job
  {"id":"job_..","object":"batch","status":"QUEUED",..}), GET /v1/batch/jobs/{id},
  GET /v1/webhooks ([]), POST /v1/webhooks, GET /v1/service-accounts ({"items":[]}),
  POST /v1/service-accounts.
Anything else: 404 {"detail":"Not Found"}; a known path with another method: 405
{"detail":"Method Not Allowed"} with `allow` (FastAPI's APIRoute: HEAD is not implied by GET).

Auth: exactly `Authorization: Bearer <one of the --key values>`, else 401 {"detail":"Invalid API
Key"}; checked before routing (an unknown path without a key is a 401).

Routing works like FastAPI/Starlette: the route is matched on the percent-DECODED path
(`/v1/%63hat/completions` is chat completions), the query string never changes the route, `//` is
not merged (`/v1//chat/completions` is a 404), and a trailing slash is a 404 (no redirect).

Compression: when the request's Accept-Encoding accepts gzip (q>0, or `*`) the body is gzip, else
when it accepts deflate it is a zlib stream; `Content-Encoding` and `Vary: Accept-Encoding` are set.
This covers JSON, errors and SSE streams (compressed with Z_SYNC_FLUSH after every event, so they
still stream). `identity` or no header: plain. The control API is never compressed.

Request bodies: Content-Length or `Transfer-Encoding: chunked` (chunk extensions and trailers are
read; trailers are recorded under `trailers` and otherwise ignored). A malformed body is a 400 and
closes the connection (recorded with `bad_body`). A JSON route with a body that is not a JSON object:
400 {"object":"error",...}; a missing or invalid field: FastAPI's 422 {"detail":[{"type","loc",
"msg",...}]}. A bug in the mock answers 500 (traceback on stderr) rather than dropping the connection.

Usage is deterministic: prompt_tokens = characters of the prompt text // 4 + 1; completion_tokens =
min(max_tokens, 16) per choice (16 without max_tokens), unless a behaviour overrides it.

Behaviours (POST /__mock/behaviour or MockMistral.behaviour(**kw); all merged, reset clears them):
  usage {prompt_tokens, completion_tokens, cached_tokens}  forced usage on every metered route
                          (completion_tokens is the total over all choices; for /v1/responses they
                          become input/output tokens; transcriptions keep their audio tokens)
  stream_chunks N         content chunks / delta events per stream (per choice) (default 3)
  chunk_delay_ms N        delay before each content chunk
  abort_after_chunks N    drop the connection after N content chunks (counted over all choices)
  status N                answer every authorized /v1 request with a Mistral error of that status
                          (a request header `x-mock-status: N` does the same for one request)
  service_tier            usage.service_tier on chat (default standard)
  agent_model             the model that answers agent requests (default mistral-medium-latest)
  conversation_model      the model of a conversation the mock does not know (default
                          mistral-medium-latest)
  ocr_pages N             pages processed when the OCR request names none (default 3)
  ocr_model, ocr_doc_size_bytes   (defaults mistral-ocr-2505, 1234)
  audio_seconds S         usage.prompt_audio_seconds of a transcription (default 12)
  transcription_model     (default voxtral-mini-2507)

Control API for tests (not under /v1, no auth, never compressed):
  GET  /__mock/requests   every request received: {method, path (decoded, no query), raw_path (as
                          received, no query), query, headers (lower-case; repeated ones joined
                          with ", "), trailers, body, accept_encoding (the header as seen, or
                          null), response_encoding (gzip | deflate | null: what the mock answered)}
  Behaviour force_encoding (gzip | deflate) compresses every response whatever the request asked.
  POST /__mock/reset      forget requests and behaviour
  POST /__mock/behaviour  merge into the behaviour (see above); answers the whole behaviour
  POST /__mock/alerts     accepts (and records) budget alert webhooks
"""

from __future__ import annotations

import argparse
import email.message
import gzip
import json
import math
import random
import re
import socket
import string
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODELS = ["mistral-small-latest", "mistral-large-latest", "mistral-medium-latest", "codestral-latest",
          "mistral-embed", "ministral-8b-latest"]

MODERATION_CATEGORIES = ["sexual", "hate_and_discrimination", "violence_and_threats",
                         "dangerous_and_criminal_content", "selfharm", "health", "financial", "law", "pii"]


class State:
    def __init__(self, keys: list[str]):
        self.keys = set(keys)
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.behaviour: dict = {}
        self.conversations: dict[str, str] = {}  # conversation id -> model

    def record(self, entry: dict) -> None:
        with self.lock:
            self.requests.append(entry)

    def current(self) -> dict:
        with self.lock:
            return dict(self.behaviour)


class Invalid(Exception):
    """A request FastAPI would refuse with 422: `detail` is its list of errors."""

    def __init__(self, *detail: dict):
        super().__init__(detail)
        self.detail = list(detail)


class BadRequest(Exception):
    """A request the HTTP layer cannot read (malformed chunked body, bad Content-Length)."""


def missing(*loc) -> Invalid:
    return Invalid({"type": "missing", "loc": ["body", *loc], "msg": "Field required"})


def lax_int(value, loc: tuple, ge: int | None = None) -> int:
    """An int the way pydantic v2 (lax mode) reads one; raises Invalid with FastAPI's error."""
    where = ["body", *loc]
    if isinstance(value, bool):
        v = int(value)
    elif isinstance(value, int):
        v = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise Invalid({"type": "finite_number", "loc": where, "msg": "Input should be a finite number",
                           "input": value})
        if not value.is_integer():
            raise Invalid({"type": "int_from_float", "loc": where,
                           "msg": "Input should be a valid integer, got a number with a fractional part",
                           "input": value})
        v = int(value)
    elif isinstance(value, str):
        if not re.fullmatch(r"\s*[+-]?\d+\s*", value):
            raise Invalid({"type": "int_parsing", "loc": where,
                           "msg": "Input should be a valid integer, unable to parse string as an integer",
                           "input": value})
        v = int(value)
    else:
        raise Invalid({"type": "int_type", "loc": where, "msg": "Input should be a valid integer",
                       "input": value})
    if ge is not None and v < ge:
        raise Invalid({"type": "greater_than_equal", "loc": where,
                       "msg": f"Input should be greater than or equal to {ge}", "input": value,
                       "ctx": {"ge": ge}})
    return v


def lax_bool(value, loc: tuple) -> bool:
    """A bool the way pydantic v2 (lax mode) reads one (null: false); raises Invalid otherwise."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in {"true", "1", "yes", "on", "t", "y"}:
            return True
        if text in {"false", "0", "no", "off", "f", "n"}:
            return False
    raise Invalid({"type": "bool_parsing", "loc": ["body", *loc],
                   "msg": "Input should be a valid boolean, unable to interpret input", "input": value})


def words(n: int) -> list[str]:
    return [random.choice(["one", " two", " three", " four", " five"]) for _ in range(max(1, n))]


def padding() -> str:
    return "".join(random.choices(string.ascii_lowercase, k=random.randint(1, 20)))


def text_of(value) -> str:
    """The text in a prompt: strings, lists of them, messages/entries with `content`, parts with `text`."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(text_of(v) for v in value)
    if isinstance(value, dict):
        if "messages" in value:
            return text_of(value["messages"])
        if "content" in value:
            return text_of(value["content"])
        if isinstance(value.get("text"), str):
            return value["text"]
    return ""


def prompt_text(req: dict) -> str:
    if "messages" in req:
        parts = []
        for m in req["messages"]:
            c = m.get("content")
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(p.get("text", "") for p in c if isinstance(p, dict))
        return "".join(parts)
    if "prompt" in req:
        return str(req.get("prompt", "")) + str(req.get("suffix") or "")
    inputs = req.get("input", req.get("inputs", ""))
    return text_of(inputs) if isinstance(inputs, list) else str(inputs)


def prompt_tokens_of(text: str) -> int:
    return len(text) // 4 + 1


def usage_for(req: dict, behaviour: dict, embeddings: bool = False, n: int = 1) -> dict:
    prompt = prompt_tokens_of(prompt_text(req))
    completion = 0 if embeddings else n * min(req.get("max_tokens") or 16, 16)
    forced = behaviour.get("usage") or {}
    prompt = forced.get("prompt_tokens", prompt)
    completion = forced.get("completion_tokens", completion)
    usage = {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}
    if not embeddings:
        usage["prompt_tokens_details"] = {"cached_tokens": forced.get("cached_tokens", 0)}
        usage["service_tier"] = behaviour.get("service_tier", "standard")
    return usage


def forced_pair(behaviour: dict, prompt: int, completion: int) -> tuple[int, int]:
    forced = behaviour.get("usage") or {}
    return forced.get("prompt_tokens", prompt), forced.get("completion_tokens", completion)


def choose_coding(header: str | None) -> str | None:
    """gzip when Accept-Encoding accepts it (q>0, or `*`), else deflate, else None (identity)."""
    if not header:
        return None
    weights: dict[str, float] = {}
    for item in header.split(","):
        params = item.strip().split(";")
        coding = params[0].strip().lower()
        if not coding:
            continue
        q = 1.0
        for p in params[1:]:
            k, _, v = p.strip().partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v.strip())
                except ValueError:
                    q = 0.0
        weights[coding] = q
    star = weights.get("*")

    def accepted(coding: str) -> bool:
        if coding in weights:
            return weights[coding] > 0
        return star is not None and star > 0

    if accepted("gzip"):
        return "gzip"
    if accepted("deflate"):
        return "deflate"
    return None


def compress(body: bytes, coding: str | None) -> bytes:
    if coding == "gzip":
        return gzip.compress(body)
    if coding == "deflate":
        return zlib.compress(body)
    return body


def pages_asked(pages) -> list[int] | None:
    """OCR `pages`: a list of ints or a string like "0,2-4"; None when not given."""
    if pages is None:
        return None
    if isinstance(pages, list):
        return [lax_int(p, ("pages", i)) for i, p in enumerate(pages)]
    if isinstance(pages, str):
        out: list[int] = []
        for part in pages.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m:
                out.extend(range(int(m.group(1)), int(m.group(2)) + 1))
            elif part.isdigit():
                out.append(int(part))
            elif part:
                raise Invalid({"type": "value_error", "loc": ["body", "pages"],
                               "msg": f"Value error, invalid page range: {part}", "input": pages})
        return out
    raise Invalid({"type": "list_type", "loc": ["body", "pages"], "msg": "Input should be a valid list",
                   "input": pages})


def form_fields(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]] | None:
    """name -> (filename, value) of a form (FastAPI's Form(): multipart/form-data, or
    application/x-www-form-urlencoded, which httpx sends when there is no file); None otherwise."""
    msg = email.message.Message()
    msg["content-type"] = content_type
    if msg.get_content_type() == "application/x-www-form-urlencoded":
        return {k: (None, v.encode()) for k, v in urllib.parse.parse_qsl(body.decode("latin-1"),
                                                                          keep_blank_values=True)}
    if msg.get_content_type() != "multipart/form-data" or not msg.get_param("boundary"):
        return None
    delimiter = b"--" + str(msg.get_param("boundary")).encode("latin-1")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        part = part[2:] if part.startswith(b"\r\n") else part
        head, _, value = part.partition(b"\r\n\r\n")
        if value.endswith(b"\r\n"):
            value = value[:-2]
        headers = email.message.Message()
        for line in head.decode("latin-1").split("\r\n"):
            k, _, v = line.partition(":")
            if k.strip():
                headers[k.strip()] = v.strip()
        name = headers.get_param("name", header="content-disposition")
        if name is not None:
            fields[str(name)] = (headers.get_filename(), value)
    return fields


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def sse_data(doc) -> bytes:
    return b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc).encode()) + b"\n\n"


def sse_event(name: str, doc: dict) -> bytes:
    return b"event: " + name.encode() + b"\n" + sse_data(doc)


# Routes: (decoded path pattern, {method: (handler name, body kind)}). Body kinds: "json" (a JSON
# object is required), "form" (multipart or urlencoded), "raw" (the bytes), None (the body is
# ignored). Matching is Starlette's: the first route matching path and method wins; else the first
# matching the path gives a 405.
SEG = r"(?P<id>[^/]+)"
ROUTES = [
    ("/v1/chat/completions", {"POST": ("chat", "json")}),
    ("/v1/fim/completions", {"POST": ("chat", "json")}),
    ("/v1/agents/completions", {"POST": ("chat", "json")}),
    ("/v1/embeddings", {"POST": ("embeddings", "json")}),
    ("/v1/responses", {"POST": ("responses_create", "json")}),
    ("/v1/responses/input_tokens", {"POST": ("input_tokens", "json")}),
    ("/v1/conversations", {"POST": ("conversation", "json"), "GET": ("conversation_list", None)}),
    (f"/v1/conversations/{SEG}", {"POST": ("conversation", "json"), "GET": ("conversation_get", None),
                                  "DELETE": ("conversation_delete", None)}),
    (f"/v1/conversations/{SEG}/restart", {"POST": ("conversation", "json")}),
    ("/v1/ocr", {"POST": ("ocr", "json")}),
    ("/v1/audio/transcriptions", {"POST": ("transcription", "form")}),
    ("/v1/moderations", {"POST": ("moderation", "json")}),
    ("/v1/chat/moderations", {"POST": ("moderation", "json")}),
    ("/v1/classifications", {"POST": ("classification", "json")}),
    ("/v1/chat/classifications", {"POST": ("classification", "json")}),
    ("/v1/models", {"GET": ("models", None)}),
    (f"/v1/models/{SEG}", {"GET": ("model_card", None), "DELETE": ("model_delete", None)}),
    ("/v1/files", {"GET": ("files_list", None), "POST": ("file_upload", "raw")}),
    ("/v1/batch/jobs", {"GET": ("batch_list", None), "POST": ("batch_create", "json")}),
    (f"/v1/batch/jobs/{SEG}", {"GET": ("batch_get", None)}),
    ("/v1/webhooks", {"GET": ("webhooks_list", None), "POST": ("webhook_create", "json")}),
    ("/v1/service-accounts", {"GET": ("service_accounts_list", None),
                              "POST": ("service_account_create", "json")}),
]
COMPILED = [(re.compile(pattern), methods) for pattern, methods in ROUTES]


def match_route(method: str, path: str):
    """(handler name, body kind, path params) | ("405", allowed methods) | None (404)."""
    partial = None
    for pattern, methods in COMPILED:
        m = pattern.fullmatch(path)
        if not m:
            continue
        if method in methods:
            name, kind = methods[method]
            return name, kind, m.groupdict()
        if partial is None:
            partial = ("405", sorted(methods))
    return partial


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock-mistral"
    state: State  # set on the subclass
    coding: str | None = None  # the content coding of this response (gzip | deflate | None)
    _z = None  # the compressor of a compressed stream
    _responded = False  # a status line went out for the current request

    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    def setup(self):
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle's algorithm and the
        # peer's delayed ACK add ~40 ms to every response on a kept-alive connection.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # --- plumbing -----------------------------------------------------------------------------
    def read_body(self) -> tuple[bytes, dict]:
        """The request body (Content-Length or chunked) and the chunked trailers."""
        te = self.headers.get("transfer-encoding")
        if te is not None:
            if te.strip().lower() != "chunked":
                raise BadRequest(f"unsupported transfer-encoding {te!r}")
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                if not line.endswith(b"\n"):
                    raise BadRequest("truncated chunk size line")
                size_text = line.split(b";", 1)[0].strip()
                if not re.fullmatch(rb"[0-9A-Fa-f]+", size_text):
                    raise BadRequest("bad chunk size")
                size = int(size_text, 16)
                if size == 0:
                    break
                data = self.rfile.read(size)
                if len(data) != size or self.rfile.read(2) != b"\r\n":
                    raise BadRequest("truncated chunk")
                chunks.append(data)
            trailers: dict[str, str] = {}
            while True:
                line = self.rfile.readline(65537)
                if not line.endswith(b"\n"):
                    raise BadRequest("truncated trailers")
                if line in (b"\r\n", b"\n"):
                    break
                k, sep, v = line.decode("latin-1").partition(":")
                if not sep:
                    raise BadRequest("bad trailer line")
                k = k.strip().lower()
                trailers[k] = f"{trailers[k]}, {v.strip()}" if k in trailers else v.strip()
            return b"".join(chunks), trailers
        length = self.headers.get("content-length")
        if length is None:
            return b"", {}
        if not length.strip().isdigit():
            raise BadRequest("bad content-length")
        length = int(length)
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise BadRequest("truncated body")
        return body, {}

    def header_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in self.headers.items():
            k = k.lower()
            out[k] = f"{out[k]}, {v}" if k in out else v
        return out

    def send_response(self, code, message=None):
        super().send_response(code, message)
        self._responded = True

    def send_json(self, status: int, doc, extra: dict | None = None) -> None:
        body = compress(json.dumps(doc).encode(), self.coding)
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        if self.coding:
            self.send_header("content-encoding", self.coding)
            self.send_header("vary", "Accept-Encoding")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_empty(self, status: int) -> None:
        self.send_response(status)
        self.end_headers()

    def error(self, status: int, message: str, type_: str = "invalid_request_error", code: str = "3000") -> None:
        self.send_json(status, {"object": "error", "message": message, "type": type_, "param": None, "code": code})

    def authorized(self) -> bool:
        auth = self.headers.get("authorization", "")
        if auth.startswith("Bearer ") and auth[len("Bearer "):] in self.state.keys:
            return True
        self.send_json(401, {"detail": "Invalid API Key"})
        return False

    # --- streams: chunked transfer-encoding, compressed per event when asked -------------------
    def begin_stream(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("transfer-encoding", "chunked")
        if self.coding:
            self.send_header("content-encoding", self.coding)
            self.send_header("vary", "Accept-Encoding")
            self._z = zlib.compressobj(wbits=31 if self.coding == "gzip" else 15)
        self.end_headers()

    def _write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def send_event(self, data: bytes) -> None:
        if self._z is not None:
            data = self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)
        self._write_chunk(data)

    def end_stream(self) -> None:
        if self._z is not None:
            self._write_chunk(self._z.flush())
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def tick(self, behaviour: dict, sent: int) -> bool:
        """Before content chunk number `sent`: abort (False) or wait the chunk delay (True)."""
        abort_after = behaviour.get("abort_after_chunks")
        if abort_after is not None and sent >= int(abort_after):
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)
            return False
        delay = int(behaviour.get("chunk_delay_ms", 0)) / 1000
        if delay:
            time.sleep(delay)
        return True

    # --- dispatch -----------------------------------------------------------------------------
    def handle_any(self) -> None:
        method = self.command
        self.coding = None
        self._z = None
        self._responded = False
        # The request target as received: http.server rewrites a leading `//` in self.path.
        words_ = self.requestline.split()
        target = words_[1] if len(words_) >= 2 else self.path
        raw_path, _, query = target.partition("?")
        path = urllib.parse.unquote(raw_path)
        try:
            body, trailers = self.read_body()
        except BadRequest as e:
            self.state.record({"method": method, "path": path, "raw_path": raw_path, "query": query,
                               "headers": self.header_dict(), "trailers": {}, "body": "",
                               "accept_encoding": None, "response_encoding": None, "bad_body": str(e)})
            self.close_connection = True
            return self.send_json(400, {"detail": f"Bad request body: {e}"}, {"connection": "close"})
        entry = {"method": method, "path": path, "raw_path": raw_path, "query": query,
                 "headers": self.header_dict(), "trailers": trailers,
                 "body": body.decode("utf-8", "replace")}
        if path.startswith("/__mock/"):
            return self.control(method, path, body, entry)
        accept = entry["headers"].get("accept-encoding")
        # Behaviour `force_encoding` (gzip | deflate): an upstream that ignores what it was asked.
        self.coding = self.state.current().get("force_encoding") or choose_coding(accept)
        entry["accept_encoding"] = accept
        entry["response_encoding"] = self.coding
        self.state.record(entry)
        if not self.authorized():
            return
        behaviour = self.state.current()
        # Header x-mock-status N: this one request fails, for mixed traffic (soak tests).
        status = behaviour.get("status") or entry["headers"].get("x-mock-status")
        if status:
            return self.error(int(status), "Service unavailable (mock)", "server_error", "1000")
        found = match_route(method, path)
        if found is None:
            return self.send_json(404, {"detail": "Not Found"})
        if found[0] == "405":
            return self.send_json(405, {"detail": "Method Not Allowed"}, {"allow": ", ".join(found[1])})
        name, kind, params = found
        req = None
        if kind == "json":
            try:
                req = json.loads(body)
                assert isinstance(req, dict)
            except (ValueError, AssertionError):
                return self.error(400, "Invalid JSON body")
        elif kind == "form":
            req = form_fields(self.headers.get("content-type", ""), body)
            if req is None:
                return self.send_json(422, {"detail": [{"type": "missing", "loc": ["body", "model"],
                                                        "msg": "Field required"}]})
        elif kind == "raw":
            req = body
        try:
            getattr(self, name)(req, behaviour, path=path, **params)
        except Invalid as e:
            self.send_json(422, {"detail": e.detail})
        except (BrokenPipeError, ConnectionResetError):
            # The proxy went away mid-response (its client aborted): what a real upstream sees.
            self.close_connection = True
        except Exception as e:  # a mock bug: answer 500 rather than dropping the connection
            traceback.print_exc()
            self.close_connection = True
            if not self._responded:
                self.error(500, f"mock error: {e!r}", "server_error", "1000")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_any

    # --- control API --------------------------------------------------------------------------
    def control(self, method: str, path: str, body: bytes, entry: dict) -> None:
        if path == "/__mock/requests" and method == "GET":
            with self.state.lock:
                return self.send_json(200, list(self.state.requests))
        if path == "/__mock/reset" and method == "POST":
            with self.state.lock:
                self.state.requests.clear()
                self.state.behaviour.clear()
            return self.send_json(200, {"ok": True})
        if path == "/__mock/behaviour" and method == "POST":
            with self.state.lock:
                self.state.behaviour.update(json.loads(body or b"{}"))
                return self.send_json(200, dict(self.state.behaviour))
        if path == "/__mock/alerts" and method == "POST":
            self.state.record(entry)
            return self.send_json(200, {"ok": True})
        self.send_json(404, {"detail": "Not Found"})

    # --- chat, FIM, agents --------------------------------------------------------------------
    def chat(self, req: dict, behaviour: dict, path: str) -> None:
        if path == "/v1/agents/completions":
            # An agent request names the agent; the agent's model answers.
            if not isinstance(req.get("agent_id"), str):
                raise missing("agent_id")
            req = {**req, "model": behaviour.get("agent_model", "mistral-medium-latest")}
        if not isinstance(req.get("model"), str):
            raise missing("model")
        n = 1 if req.get("n") is None else lax_int(req["n"], ("n",), ge=1)
        if req.get("max_tokens") is not None:
            req = {**req, "max_tokens": lax_int(req["max_tokens"], ("max_tokens",), ge=0)}
        usage = usage_for(req, behaviour, n=n)
        ident = uuid.uuid4().hex
        created = int(time.time())
        if lax_bool(req.get("stream"), ("stream",)):
            return self.chat_stream(req, behaviour, usage, ident, created, n)
        per_choice = max(1, usage["completion_tokens"] // n)
        self.send_json(200, {
            "id": ident, "created": created, "model": req["model"], "usage": usage,
            "object": "chat.completion",
            "choices": [{"index": i, "finish_reason": "stop",
                         "message": {"role": "assistant", "tool_calls": None,
                                     "content": "".join(words(per_choice))}} for i in range(n)]})

    def chat_stream(self, req: dict, behaviour: dict, usage: dict, ident: str, created: int, n: int) -> None:
        chunks = int(behaviour.get("stream_chunks", 3))
        self.begin_stream()
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": req["model"]}
        sent = 0
        for c in range(n):
            self.send_event(sse_data({**base, "choices": [
                {"index": c, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))
            for i in range(chunks):
                if not self.tick(behaviour, sent):
                    return
                sent += 1
                last = i == chunks - 1
                doc = {**base, "choices": [{"index": c, "delta": {"content": "".join(words(1))},
                                            "finish_reason": "stop" if last else None}],
                       "p": padding()}
                if last and c == n - 1:
                    doc["usage"] = usage
                self.send_event(sse_data(doc))
        self.send_event(b"data: [DONE]\n\n")
        self.end_stream()

    def embeddings(self, req: dict, behaviour: dict, path: str) -> None:
        if not isinstance(req.get("model"), str):
            raise missing("model")
        inputs = req.get("input", req.get("inputs"))
        if not isinstance(inputs, (str, list)):
            raise missing("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        self.send_json(200, {
            "id": uuid.uuid4().hex, "object": "list", "model": req["model"],
            "data": [{"object": "embedding", "embedding": [round(random.uniform(-1, 1), 6) for _ in range(8)],
                      "index": i} for i in range(len(inputs))],
            "usage": usage_for(req, behaviour, embeddings=True)})

    # --- Responses API ------------------------------------------------------------------------
    def responses_prompt(self, req: dict) -> int:
        if not isinstance(req.get("model"), str):
            raise missing("model")
        if not isinstance(req.get("input"), (str, list)):
            raise missing("input")
        return prompt_tokens_of(text_of(req.get("instructions") or "") + text_of(req["input"]))

    def input_tokens(self, req: dict, behaviour: dict, path: str) -> None:
        prompt, _ = forced_pair(behaviour, self.responses_prompt(req), 0)
        self.send_json(200, {"object": "response.input_tokens", "input_tokens": prompt})

    def responses_create(self, req: dict, behaviour: dict, path: str) -> None:
        prompt = self.responses_prompt(req)
        cap = req.get("max_output_tokens")
        cap = 16 if cap is None else lax_int(cap, ("max_output_tokens",), ge=1)
        prompt, output = forced_pair(behaviour, prompt, min(cap, 16))
        forced = behaviour.get("usage") or {}
        usage = {"input_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output,
                 "input_tokens_details": {"cached_tokens": forced.get("cached_tokens", 0), "cache_write_tokens": 0},
                 "output_tokens_details": {"reasoning_tokens": 0}}
        ident, item = "resp_" + uuid.uuid4().hex, "msg_" + uuid.uuid4().hex
        text = "".join(words(output))

        def response(status: str, text: str, usage) -> dict:
            return {"id": ident, "object": "response", "created_at": int(time.time()), "status": status,
                    "model": req["model"], "max_output_tokens": req.get("max_output_tokens"),
                    "instructions": req.get("instructions"), "parallel_tool_calls": True,
                    "tool_choice": req.get("tool_choice", "auto"), "tools": req.get("tools") or [],
                    "output": [{"type": "message", "id": item, "status": status, "role": "assistant",
                                "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                    "usage": usage}

        if not lax_bool(req.get("stream"), ("stream",)):
            return self.send_json(200, response("completed", text, usage))
        chunks = int(behaviour.get("stream_chunks", 3))
        self.begin_stream()
        seq = 0
        created = response("in_progress", "", None)
        created["output"] = []
        self.send_event(sse_event("response.created", {"type": "response.created", "sequence_number": seq,
                                                       "response": created}))
        pieces = []
        for i in range(chunks):
            if not self.tick(behaviour, i):
                return
            seq += 1
            piece = "".join(words(1))
            pieces.append(piece)
            self.send_event(sse_event("response.output_text.delta", {
                "type": "response.output_text.delta", "sequence_number": seq, "item_id": item,
                "output_index": 0, "content_index": 0, "delta": piece, "logprobs": []}))
        seq += 1
        self.send_event(sse_event("response.completed", {
            "type": "response.completed", "sequence_number": seq,
            "response": response("completed", "".join(pieces), usage)}))
        self.end_stream()

    # --- Conversations ------------------------------------------------------------------------
    def conversation(self, req: dict, behaviour: dict, path: str, id: str | None = None) -> None:
        inputs = req.get("inputs")
        if id is None:
            if not isinstance(inputs, (str, list)):
                raise missing("inputs")
            agent_id = req.get("agent_id")
            if isinstance(agent_id, str):
                model = behaviour.get("agent_model", "mistral-medium-latest")
            elif isinstance(req.get("model"), str):
                model, agent_id = req["model"], None
            else:
                return self.error(400, "Either model or agent_id must be provided")
            conv_id = "conv_" + uuid.uuid4().hex
            with self.state.lock:
                self.state.conversations[conv_id] = model
        else:
            conv_id, agent_id = id, None
            with self.state.lock:
                model = self.state.conversations.get(conv_id)
            model = model or behaviour.get("conversation_model", "mistral-medium-latest")
        args = req.get("completion_args") or {}
        if not isinstance(args, dict):
            raise Invalid({"type": "model_attributes_type", "loc": ["body", "completion_args"],
                           "msg": "Input should be a valid dictionary or object to extract fields from",
                           "input": args})
        cap = args.get("max_tokens")
        cap = 16 if cap is None else lax_int(cap, ("completion_args", "max_tokens"), ge=0)
        prompt = prompt_tokens_of(text_of(req.get("instructions") or "") + text_of(inputs or ""))
        prompt, completion = forced_pair(behaviour, prompt, min(cap or 16, 16))
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion, "connector_tokens": None}
        entry_id = "msg_" + uuid.uuid4().hex
        if not lax_bool(req.get("stream"), ("stream",)):
            return self.send_json(200, {
                "object": "conversation.response", "conversation_id": conv_id,
                "outputs": [{"object": "entry", "type": "message.output", "created_at": iso_now(),
                             "completed_at": iso_now(), "id": entry_id, "agent_id": agent_id,
                             "model": model, "role": "assistant", "content": "".join(words(completion))}],
                "usage": usage})
        chunks = int(behaviour.get("stream_chunks", 3))
        self.begin_stream()
        self.send_event(sse_event("conversation.response.started", {
            "type": "conversation.response.started", "created_at": iso_now(), "conversation_id": conv_id}))
        for i in range(chunks):
            if not self.tick(behaviour, i):
                return
            self.send_event(sse_event("message.output.delta", {
                "type": "message.output.delta", "created_at": iso_now(), "output_index": 0, "id": entry_id,
                "content_index": 0, "model": model, "agent_id": agent_id, "role": "assistant",
                "content": "".join(words(1))}))
        self.send_event(sse_event("conversation.response.done", {
            "type": "conversation.response.done", "created_at": iso_now(), "usage": usage}))
        self.end_stream()

    def conversation_list(self, _req, _behaviour, path: str) -> None:
        self.send_json(200, [])

    def conversation_get(self, _req, behaviour: dict, path: str, id: str) -> None:
        with self.state.lock:
            model = self.state.conversations.get(id)
        self.send_json(200, {"object": "conversation", "id": id, "created_at": iso_now(),
                             "updated_at": iso_now(),
                             "model": model or behaviour.get("conversation_model", "mistral-medium-latest"),
                             "instructions": None, "tools": [], "completion_args": {}, "name": None,
                             "description": None, "metadata": {}})

    def conversation_delete(self, _req, _behaviour, path: str, id: str) -> None:
        with self.state.lock:
            self.state.conversations.pop(id, None)
        self.send_empty(204)

    # --- OCR, audio, moderation, classification -----------------------------------------------
    def ocr(self, req: dict, behaviour: dict, path: str) -> None:
        if "model" not in req:
            raise missing("model")
        if not isinstance(req.get("document"), dict):
            raise missing("document")
        asked = pages_asked(req.get("pages"))
        indexes = asked if asked is not None else list(range(int(behaviour.get("ocr_pages", 3))))
        self.send_json(200, {
            "pages": [{"index": i, "markdown": f"# Page {i + 1}\n\n" + "".join(words(8)), "images": [],
                       "dimensions": {"dpi": 200, "height": 2200, "width": 1700}} for i in indexes],
            "model": behaviour.get("ocr_model", "mistral-ocr-2505"),
            "document_annotation": None,
            "usage_info": {"pages_processed": len(indexes),
                           "doc_size_bytes": behaviour.get("ocr_doc_size_bytes", 1234)}})

    def transcription(self, fields: dict, behaviour: dict, path: str) -> None:
        if "model" not in fields:
            raise missing("model")
        if not any(k in fields for k in ("file", "file_url", "file_id")):
            raise missing("file")
        stream = lax_bool(fields.get("stream", (None, b"false"))[1].decode("latin-1"), ("stream",))
        seconds = behaviour.get("audio_seconds", 12)
        prompt, completion = forced_pair(behaviour, 9, 16)
        audio_tokens = round(seconds * 12.5)
        usage = {"prompt_audio_seconds": seconds, "prompt_tokens": prompt,
                 "total_tokens": prompt + audio_tokens + completion, "completion_tokens": completion}
        model = behaviour.get("transcription_model", "voxtral-mini-2507")
        language = fields.get("language", (None, b"en"))[1].decode("utf-8", "replace") or "en"
        if not stream:
            return self.send_json(200, {"model": model, "text": "".join(words(completion)).strip(),
                                        "language": language, "segments": [], "usage": usage})
        chunks = int(behaviour.get("stream_chunks", 3))
        self.begin_stream()
        self.send_event(sse_event("transcription.language",
                                  {"type": "transcription.language", "audio_language": language}))
        pieces = []
        for i in range(chunks):
            if not self.tick(behaviour, i):
                return
            piece = "".join(words(1))
            pieces.append(piece)
            self.send_event(sse_event("transcription.text.delta", {"type": "transcription.text.delta",
                                                                   "text": piece}))
        self.send_event(sse_event("transcription.done", {
            "type": "transcription.done", "model": model, "text": "".join(pieces).strip(),
            "language": language, "segments": [], "usage": usage}))
        self.end_stream()

    def classifier_inputs(self, req: dict, path: str) -> tuple[list, int]:
        """The inputs of a moderation/classification request, one per result, and prompt tokens."""
        if not isinstance(req.get("model"), str):
            raise missing("model")
        canonical = "input" if path == "/v1/chat/classifications" else "inputs"
        inputs = req.get(canonical, req.get("input", req.get("inputs")))
        if not isinstance(inputs, (str, list, dict)) or inputs in ([], ""):
            raise missing(canonical)
        if isinstance(inputs, (str, dict)):
            items = [inputs]
        elif path == "/v1/chat/moderations" and not all(isinstance(i, list) for i in inputs):
            items = [inputs]  # one conversation (a list of messages), not a list of them
        else:
            items = inputs
        return items, prompt_tokens_of(text_of(items))

    def classifier_usage(self, behaviour: dict, prompt: int) -> dict:
        prompt, completion = forced_pair(behaviour, prompt, 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def moderation(self, req: dict, behaviour: dict, path: str) -> None:
        items, prompt = self.classifier_inputs(req, path)
        results = []
        for _ in items:
            scores = {c: round(random.uniform(0, 0.05), 6) for c in MODERATION_CATEGORIES}
            results.append({"categories": {c: False for c in MODERATION_CATEGORIES}, "category_scores": scores})
        self.send_json(200, {"id": uuid.uuid4().hex, "model": req["model"], "results": results,
                             "usage": self.classifier_usage(behaviour, prompt)})

    def classification(self, req: dict, behaviour: dict, path: str) -> None:
        items, prompt = self.classifier_inputs(req, path)
        results = [{"label": {"scores": {"positive": 0.9, "negative": 0.1}}} for _ in items]
        self.send_json(200, {"id": uuid.uuid4().hex, "model": req["model"], "results": results,
                             "usage": self.classifier_usage(behaviour, prompt)})

    # --- models -------------------------------------------------------------------------------
    def model_card(self, _req, _behaviour, path: str, id: str) -> None:
        self.send_json(200, {"id": id, "object": "model", "created": int(time.time()), "owned_by": "mistralai",
                "capabilities": {"completion_chat": not id.endswith("embed"), "completion_fim": False,
                                 "function_calling": True, "fine_tuning": False, "vision": False,
                                 "classification": False},
                "name": id, "description": f"{id} (mock)", "max_context_length": 131072, "aliases": [],
                "deprecation": None, "default_model_temperature": 0.3, "type": "base"})

    def models(self, _req, _behaviour, path: str) -> None:
        created = int(time.time())
        self.send_json(200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "mistralai",
             "capabilities": {"completion_chat": not m.endswith("embed")}} for m in MODELS]})

    def model_delete(self, _req, _behaviour, path: str, id: str) -> None:
        self.send_json(200, {"id": id, "object": "model", "deleted": True})

    # --- management (present so tests can prove the filter refuses them) -----------------------
    def files_list(self, _req, _behaviour, path: str) -> None:
        self.send_json(200, {"data": [], "object": "list", "total": 0})

    def file_upload(self, body: bytes, _behaviour, path: str) -> None:
        fields = form_fields(self.headers.get("content-type", ""), body) or {}
        upload = next(((f, v) for f, v in fields.values() if f), ("upload.jsonl", b""))
        self.send_json(200, {"id": str(uuid.uuid4()), "object": "file", "bytes": len(upload[1]),
                             "created_at": int(time.time()), "filename": upload[0],
                             "purpose": "batch", "sample_type": "batch_request", "source": "upload"})

    def batch_job(self, req: dict | None, job_id: str | None = None) -> dict:
        req = req or {}
        return {"id": job_id or "job_" + uuid.uuid4().hex, "object": "batch",
                "input_files": req.get("input_files") or [], "metadata": req.get("metadata"),
                "endpoint": req.get("endpoint", "/v1/chat/completions"), "model": req.get("model"),
                "agent_id": req.get("agent_id"), "output_file": None, "error_file": None, "errors": [],
                "status": "QUEUED", "created_at": int(time.time()), "total_requests": len(req.get("requests") or []),
                "completed_requests": 0, "succeeded_requests": 0, "failed_requests": 0,
                "started_at": None, "completed_at": None}

    def batch_list(self, _req, _behaviour, path: str) -> None:
        self.send_json(200, {"data": [], "object": "list", "total": 0})

    def batch_create(self, req: dict, _behaviour, path: str) -> None:
        if not isinstance(req.get("endpoint"), str):
            raise missing("endpoint")
        self.send_json(200, self.batch_job(req))

    def batch_get(self, _req, _behaviour, path: str, id: str) -> None:
        self.send_json(200, self.batch_job(None, id))

    def webhooks_list(self, _req, _behaviour, path: str) -> None:
        self.send_json(200, [])

    def webhook_create(self, req: dict, _behaviour, path: str) -> None:
        self.send_json(201, {"id": str(uuid.uuid4()), "name": req.get("name"), "url": req.get("url"),
                             "created_at": iso_now(), "updated_at": iso_now()})

    def service_accounts_list(self, _req, _behaviour, path: str) -> None:
        self.send_json(200, {"items": []})

    def service_account_create(self, req: dict, _behaviour, path: str) -> None:
        self.send_json(201, {"id": str(uuid.uuid4()), "name": req.get("name"), "description": None,
                             "created_at": iso_now(), "updated_at": iso_now(), "deleted_at": None})


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A proxy closing an idle keep-alive connection, or a client gone mid-stream, is normal
        # traffic, not a mock bug: only print real errors.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def serve(port: int, keys: list[str], host: str = "127.0.0.1") -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"state": State(keys)})
    server = Server((host, port), handler)
    server.daemon_threads = True
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--key", action="append", default=[], help="an accepted real key (repeatable)")
    parser.add_argument("--key-file", action="append", default=[],
                        help="a file holding an accepted key (repeatable; keeps it out of `ps`)")
    args = parser.parse_args()
    keys = args.key + [open(f).read().strip() for f in args.key_file]
    if not keys:
        parser.error("give at least one --key or --key-file")
    server = serve(args.port, keys, args.host)
    print(f"mock-mistral listening on {args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
