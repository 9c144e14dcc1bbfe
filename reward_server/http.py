"""HTTP front of the reward server: `oirl serve-reward`.

    POST /score    {"prompts": [...], "responses": [...], "references": [...]?}   -> {"rewards": [...]}
                   or {"prompt_token_ids": [[...]], "response_token_ids": [[...]]} (decoded with the policy tokenizer)
    POST /get_reward  OpenRLHF's remote reward protocol (its `--reward.remote_url http://HOST:PORT/get_reward`):
                   {"query": [prompt + response, ...], "prompts": [...], "labels": [...]?}
                   -> {"rewards": [...], "scores": [...], "extra_logs": {}}
    GET  /health   -> {"status": "ok"}
    GET  /metrics  -> Prometheus text: requests, errors, samples scored, batches, latency, busy refusals

JSON only, never pickle. Every answer is JSON; every malformed request (bad Content-Length, non-UTF-8 or invalid
JSON, a missing or mistyped field, ragged or out-of-vocabulary token ids, an unparsable GSM8K reference, ...) gets
a 4xx whose ``{"error": ...}`` names the field and row, and the server keeps serving.

OpenRLHF sends each query as the policy tokenizer decodes prompt + response ids with their special tokens
(``skip_special_tokens=False``), and the prompt as the chat-templated text. /get_reward cuts the prompt off the front
of the query (after any special tokens before it, e.g. a BOS), then drops the policy tokenizer's special tokens
from both parts, as /score's token-id path decodes them (``skip_special_tokens=True``): the same samples get the same
rewards through either endpoint. A label is the reference (a string; a number or null is taken as its text).

Concurrent requests are batched: a scoring thread takes every queued request (up to ``max_batch_samples``) and
scores them in one call. Requests stay isolated: when a combined batch fails (a NaN reward, a user function that
raises), each request is scored again alone, so only the request that caused it fails, and its message holds only
its own text. Scoring over HTTP never updates the running normalisation statistics (``update_stats=False``), so a
remote client cannot shift a training run's state.

Limits: at most ``max_connections`` connections are served at once (more get 503 at once, not a new thread each);
each request (request line, headers and body) must arrive within ``read_timeout_s``, so a client that stalls or
trickles its bytes cannot hold a connection slot: a request begun and not finished in time gets 408 (whichever part
stalled), a connection on which no request begins in that time (a fresh one, or a kept-alive one between requests) is
closed without an answer, as there is no request to answer and a kept-alive client could take one for the answer to
its next request; body size, samples per request and a per-request scoring timeout. It binds 127.0.0.1 by default and refuses to
start on any other address without a bearer token; with a token, every request must carry it.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str = ""
    max_body_bytes: int = 8 << 20
    max_samples_per_request: int = 1024
    max_batch_samples: int = 256
    batch_wait_s: float = 0.005
    request_timeout_s: float = 60.0
    """Longest wait for a request's rewards once it is queued (504 after)."""
    max_connections: int = 32
    """Connections served at once; one more gets 503 right away."""
    read_timeout_s: float = 10.0
    """A request must arrive (line, headers, body) within this, else 408; a connection idle for it is closed."""


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- scoring: one thread, batched, isolated per request ------------------------------------------------------


class _Job:
    def __init__(self, prompts, responses, references, response_ids):
        self.args = (prompts, responses, references, response_ids)
        self.done = threading.Event()
        self.cancelled = False
        self.result: Any = None
        self.error: Exception | None = None


class BatchingScorer:
    """One thread scores queued requests together; callers wait on their own event with a timeout."""

    def __init__(self, worker: Any, max_batch: int, wait_s: float):
        self.worker, self.max_batch, self.wait_s = worker, max_batch, wait_s
        self.queue: queue.Queue[_Job] = queue.Queue()
        self.batches = self.split_batches = 0
        self.thread = threading.Thread(target=self._loop, daemon=True, name="reward-batcher")
        self.thread.start()

    def submit(self, job: _Job, timeout: float) -> Any:
        self.queue.put(job)
        if not job.done.wait(timeout):
            job.cancelled = True  # its client is gone; the loop skips it if it has not started
            raise RequestError(504, f"scoring did not finish within {timeout}s")
        if job.error is not None:
            raise job.error
        return job.result

    def _loop(self) -> None:
        while True:
            jobs = [self.queue.get()]
            n = len(jobs[0].args[1])
            deadline = time.monotonic() + self.wait_s
            while n < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                jobs.append(job)
                n += len(job.args[1])
            jobs = [j for j in jobs if not j.cancelled]
            if jobs:
                self._score(jobs)

    def _rewards(self, jobs: list[_Job]) -> list[float]:
        prompts, responses, refs, ids = [], [], [], []
        have_ids = all(j.args[3] is not None for j in jobs)
        for j in jobs:
            prompts += j.args[0]
            responses += j.args[1]
            refs += j.args[2]
            ids += j.args[3] or []
        # Never update running normalisation from HTTP: a training run's statistics are not the clients' to move.
        return self.worker.score_texts(prompts, responses, refs, ids if have_ids else None,
                                       update_stats=False).tolist()

    def _score(self, jobs: list[_Job]) -> None:
        try:
            rewards = self._rewards(jobs)
            self.batches += 1
            start = 0
            for j in jobs:
                j.result = rewards[start: start + len(j.args[1])]
                start += len(j.args[1])
        except Exception as e:
            if len(jobs) > 1:  # find the request that failed: score each alone, so the others still get rewards
                self.split_batches += 1
                for j in jobs:
                    self._score([j])
                return
            logger.warning("a /score request failed: %s", e)
            jobs[0].error = RequestError(422, f"scoring failed: {e}")
        for j in jobs:
            j.done.set()


# ---- request validation --------------------------------------------------------------------------------------

_FIELDS = ("prompts", "responses", "references", "prompt_token_ids", "response_token_ids")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _list(body: dict, name: str, hint: str) -> list:
    if name not in body:
        raise RequestError(400, f"missing field '{name}': {hint}")
    value = body[name]
    if not isinstance(value, list):
        raise RequestError(400, f"'{name}' must be a list ({hint}), got {type(value).__name__}")
    return value


def _strings(body: dict, name: str) -> list[str]:
    value = _list(body, name, "one string per sample")
    for i, x in enumerate(value):
        if not isinstance(x, str):
            raise RequestError(400, f"{name}[{i}] must be a string, got {type(x).__name__}")
    return value


def _token_ids(body: dict, name: str, vocab_size: int) -> list[list[int]]:
    value = _list(body, name, "one list of integer token ids per sample")
    for i, row in enumerate(value):
        if not isinstance(row, list):
            raise RequestError(400, f"{name}[{i}] must be a list of integer token ids, got {type(row).__name__}")
        for j, t in enumerate(row):
            if type(t) is not int:  # bool and float are not token ids
                raise RequestError(400, f"{name}[{i}][{j}] = {_short(t)} is not an integer token id")
            if not 0 <= t < vocab_size:
                raise RequestError(400, f"{name}[{i}][{j}] = {_short(t)} is outside the tokenizer's vocabulary "
                                        f"[0, {vocab_size})")
    return value


def _parse(body: Any, cfg: ServerConfig, vocab_size: int, needs_reference: bool
           ) -> tuple[list, list, list, list | None, list | None]:
    """(prompts, responses, references, prompt_ids, response_ids) of a valid body, else RequestError (4xx)."""
    if not isinstance(body, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(body).__name__}")
    unknown = [k for k in body if k not in _FIELDS]
    if unknown:
        raise RequestError(400, f"unknown field {_short(unknown[0])}; known fields: {', '.join(_FIELDS)}")
    texts = "prompts" in body or "responses" in body
    if texts == ("prompt_token_ids" in body or "response_token_ids" in body):
        raise RequestError(400, "give either 'prompts' and 'responses' (strings) or 'prompt_token_ids' and "
                                "'response_token_ids' (token ids), not " + ("both" if texts else "neither"))
    names = ("prompts", "responses") if texts else ("prompt_token_ids", "response_token_ids")
    counts = {n: len(body[n]) for n in (*names, "references") if isinstance(body.get(n), list)}
    n = max(counts.values(), default=0)
    if n > cfg.max_samples_per_request:
        raise RequestError(413, f"{n} samples in one request; the limit is {cfg.max_samples_per_request}: "
                                "split the request")
    if texts:
        prompts, responses = _strings(body, "prompts"), _strings(body, "responses")
        prompt_ids = response_ids = None
    else:
        prompt_ids, response_ids = (_token_ids(body, name, vocab_size) for name in names)
        prompts = responses = None
    if "references" not in body and needs_reference:
        raise RequestError(400, "missing field 'references': reward.kind=gsm8k scores each response against a "
                                "reference answer ('72' or GSM8K answer text ending in '#### 72')")
    refs = _strings(body, "references") if "references" in body else [""] * n
    if len(set(counts.values()) | {len(refs)}) > 1:
        raise RequestError(400, ", ".join(f"{c} {k}" for k, c in counts.items()) + ": give one of each per sample")
    if needs_reference:
        _check_references(refs, "references")
    return prompts, responses, refs, prompt_ids, response_ids


def _check_references(refs: list[str], name: str) -> None:
    """reward.kind=gsm8k: every reference must hold a number, else 400 naming ``name[i]``."""
    from reward_server.rules import parse_gsm8k_reference

    for i, ref in enumerate(refs):
        try:
            parse_gsm8k_reference(ref)
        except ValueError as e:
            raise RequestError(400, f"{name}[{i}]: {e}") from e


_OPENRLHF_FIELDS = ("query", "prompts", "labels")


def _strip(text: str, specials: list[str]) -> str:
    for token in specials:
        text = text.replace(token, "")
    return text


def _parse_openrlhf(body: Any, cfg: ServerConfig, needs_reference: bool, specials: list[str]
                    ) -> tuple[list[str], list[str], list[str]]:
    """(prompts, responses, references) of a valid OpenRLHF /get_reward body, else RequestError (4xx).

    ``specials``: the policy tokenizer's special tokens, longest first. Each response is its query after the prompt
    (special tokens before the prompt, such as a BOS, are passed over); both lose their special tokens."""
    if not isinstance(body, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(body).__name__}")
    unknown = [k for k in body if k not in _OPENRLHF_FIELDS]
    if unknown:
        raise RequestError(400, f"unknown field {_short(unknown[0])}; /get_reward (OpenRLHF's protocol) knows: "
                                f"{', '.join(_OPENRLHF_FIELDS)}")
    counts = {n: len(body[n]) for n in _OPENRLHF_FIELDS if isinstance(body.get(n), list)}
    n = max(counts.values(), default=0)
    if n > cfg.max_samples_per_request:
        raise RequestError(413, f"{n} samples in one request; the limit is {cfg.max_samples_per_request}: "
                                "split the request")
    queries = _strings(body, "query")
    prompts = _strings(body, "prompts")
    if "labels" not in body and needs_reference:
        raise RequestError(400, "missing field 'labels': reward.kind=gsm8k scores each response against its label, "
                                "the reference answer ('72' or GSM8K answer text ending in '#### 72'); set "
                                "OpenRLHF's --data.label_key")
    labels = _list(body, "labels", "one reference answer per sample") if "labels" in body else [""] * n
    refs = []
    for i, label in enumerate(labels):
        if label is None:
            label = ""
        elif isinstance(label, (int, float)) and not isinstance(label, bool):
            label = str(label)
        elif not isinstance(label, str):
            raise RequestError(400, f"labels[{i}] must be a string (or a number), got {type(label).__name__}")
        refs.append(label)
    if len(set(counts.values()) | {len(refs)}) > 1:
        raise RequestError(400, ", ".join(f"{c} {k}" for k, c in counts.items()) + ": give one of each per sample")
    if needs_reference:
        _check_references(refs, "labels")
    responses = []
    for i, (query, prompt) in enumerate(zip(queries, prompts)):
        start = 0
        while not query.startswith(prompt, start):
            lead = next((t for t in specials if query.startswith(t, start)), None)
            if lead is None:
                raise RequestError(400, f"query[{i}] does not begin with prompts[{i}] ({_short(prompt)}): each query "
                                        "is the prompt followed by the response, as OpenRLHF sends them")
            start += len(lead)
        responses.append(_strip(query[start + len(prompt):], specials))
    return [_strip(p, specials) for p in prompts], responses, refs


def _reject_constant(name: str) -> None:
    raise RequestError(400, f"body is not valid JSON: {name} is not a JSON value")


def _decode_json(data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"body is not UTF-8 (bad byte at offset {e.start}); send JSON as UTF-8") from e
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise RequestError(400, "body is not valid JSON here: nested too deeply") from e
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise RequestError(400, f"body holds a number that cannot be read: {str(e)[:100]}") from e


# ---- the server ----------------------------------------------------------------------------------------------


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = self.errors = self.samples = self.busy = 0
        self.latency_sum = 0.0

    def render(self, scorer: BatchingScorer) -> str:
        with self.lock:
            return (f"oirl_reward_requests_total {self.requests}\noirl_reward_errors_total {self.errors}\n"
                    f"oirl_reward_samples_total {self.samples}\noirl_reward_batches_total {scorer.batches}\n"
                    f"oirl_reward_split_batches_total {scorer.split_batches}\n"
                    f"oirl_reward_busy_total {self.busy}\n"
                    f"oirl_reward_latency_seconds_sum {self.latency_sum:.6f}\n")


def _json_response(status: int, payload: Any, extra: str = "") -> bytes:
    body = json.dumps(payload).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n")
    return head.encode() + body


class _BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most ``max_connections`` handler threads; one more connection gets a 503."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int, metrics: Metrics):
        self.slots = threading.BoundedSemaphore(max_connections)
        self.metrics = metrics
        self.busy_answer = _json_response(503, {"error": f"server busy: all {max_connections} connections in use; "
                                                         "retry shortly"}, "Retry-After: 1\r\n")
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            with self.metrics.lock:
                self.metrics.busy += 1
            try:
                request.settimeout(1.0)
                request.sendall(self.busy_answer)
                request.setblocking(False)
                request.recv(1 << 16)  # drop what the client has sent, so closing does not reset the connection
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Stalled(Exception):
    """The client did not send its request within read_timeout_s. Not a TimeoutError on purpose: http.server
    catches those and closes the connection without an answer, while a client whose request began is owed a 408."""


class _DeadlineReader(io.RawIOBase):
    """The connection as a raw stream whose every recv waits at most until the handler's current deadline."""

    def __init__(self, sock: socket.socket, handler: Any):
        self.sock, self.handler = sock, handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.handler.deadline - time.monotonic()
        if remaining <= 0:
            raise _Stalled("request not received in time")
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError as e:
            raise _Stalled("request not received in time") from e


_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


def make_server(worker: Any, cfg: ServerConfig) -> ThreadingHTTPServer:
    """Build (not start) the server; raises before binding when a non-loopback host has no token."""
    if not is_loopback(cfg.host) and not cfg.token:
        raise ValueError(f"refusing to serve rewards on {cfg.host} without a token: pass --token-file FILE or set "
                         "$OIRL_REWARD_TOKEN (clients send 'Authorization: Bearer <token>'), or bind 127.0.0.1")
    if cfg.max_connections < 1 or cfg.read_timeout_s <= 0:
        raise ValueError(f"max_connections={cfg.max_connections} must be >= 1 and read_timeout_s="
                         f"{cfg.read_timeout_s} > 0")
    scorer = BatchingScorer(worker, cfg.max_batch_samples, cfg.batch_wait_s)
    metrics = Metrics()
    vocab_size = len(worker.tokenizer)
    needs_reference = getattr(getattr(worker, "cfg", None), "kind", "") == "gsm8k"
    specials = sorted({t for t in worker.tokenizer.all_special_tokens if t}, key=len, reverse=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "oirl-reward"
        timeout = cfg.read_timeout_s
        deadline = 0.0

        def setup(self) -> None:
            super().setup()
            self.deadline = time.monotonic() + cfg.read_timeout_s
            self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))

        def handle_one_request(self) -> None:
            self.deadline = time.monotonic() + cfg.read_timeout_s
            try:
                begun = self.rfile.peek(1)  # the next request's first byte (or bytes a pipelining client sent)
            except _Stalled:
                begun = b""
            if not begun:  # idle or closed by the client: no request to answer
                self.close_connection = True
                return
            try:
                super().handle_one_request()
            except _Stalled:  # the request line or the headers stalled (a stalled body is answered in _read_body)
                self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
                self.send_error(408, f"request line and headers not received within {cfg.read_timeout_s}s")

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.debug("%s " + fmt, self.address_string(), *args)

        def parse_request(self) -> bool:
            if not super().parse_request():
                return False
            if self.request_version == "HTTP/0.9":  # it would be answered without a status line
                self.send_error(400, "HTTP/0.9 requests are not served; send HTTP/1.1")
                return False
            return True

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """Errors found by http.server itself (bad request line, oversized headers, unknown method) as JSON."""
            extra = {}
            if code == HTTPStatus.NOT_IMPLEMENTED:  # a method other than GET/POST
                code, message = 405, f"method {_short(self.command)} not allowed; use GET /health, GET /metrics, " \
                                     "POST /score or POST /get_reward"
                extra["Allow"] = "GET, POST"
            if self.request_version == "HTTP/0.9":
                self.request_version = "HTTP/1.0"
            with metrics.lock:
                metrics.errors += 1
            self.close_connection = True
            self._send(code, {"error": message or HTTPStatus(code).phrase}, headers=extra)

        def _send(self, status: int, payload: Any, content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.connection.settimeout(cfg.read_timeout_s)  # a client that does not read cannot block us forever
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _authorized(self) -> bool:
            if not cfg.token:
                return True
            got = self.headers.get("Authorization", "")
            return hmac.compare_digest(got.encode(), f"Bearer {cfg.token}".encode())

        def _read_body(self) -> bytes:
            """The body, by Content-Length; anything off closes the connection (its bytes cannot be framed)."""
            if "Transfer-Encoding" in self.headers:
                self.close_connection = True
                raise RequestError(411, "Transfer-Encoding bodies are not accepted; send Content-Length")
            values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
            if not values:
                self.close_connection = True
                raise RequestError(411, "Content-Length is required")
            raw = values.pop()
            if values or not _CONTENT_LENGTH.fullmatch(raw):
                self.close_connection = True
                raise RequestError(400, f"Content-Length {_short(raw)} must be one non-negative integer")
            length = int(raw)
            if length > cfg.max_body_bytes:
                self.close_connection = True  # do not read an oversized body
                raise RequestError(413, f"body of {length} bytes exceeds the limit of {cfg.max_body_bytes}")
            try:
                data = self.rfile.read(length)
            except _Stalled as e:
                self.close_connection = True
                raise RequestError(408, f"body not received within {cfg.read_timeout_s}s") from e
            if len(data) < length:
                self.close_connection = True
                raise RequestError(400, f"body ended after {len(data)} of {length} bytes")
            return data

        def do_GET(self) -> None:
            if self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers:
                self.close_connection = True  # a GET body is not read, so the connection cannot be reused
            path = urlsplit(self.path).path
            if not self._authorized():
                return self._send(401, {"error": "missing or wrong bearer token"})
            if path == "/health":
                return self._send(200, {"status": "ok"})
            if path == "/metrics":
                return self._send(200, metrics.render(scorer), "text/plain; version=0.0.4")
            self._send(404, {"error": f"no route GET {_short(path)}; use /health, /metrics, POST /score or "
                                      "POST /get_reward"})

        def do_POST(self) -> None:
            t0 = time.perf_counter()
            try:
                data = self._read_body()
                if not self._authorized():
                    raise RequestError(401, "missing or wrong bearer token")
                path = urlsplit(self.path).path
                if path not in ("/score", "/get_reward"):
                    raise RequestError(404, f"no route POST {_short(path)}; use POST /score (or POST /get_reward, "
                                            "OpenRLHF's protocol)")
                media_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if media_type != "application/json":
                    raise RequestError(415, "send JSON with Content-Type: application/json")
                r_ids = None
                if path == "/get_reward":
                    prompts, responses, refs = _parse_openrlhf(_decode_json(data), cfg, needs_reference, specials)
                else:
                    prompts, responses, refs, p_ids, r_ids = _parse(_decode_json(data), cfg, vocab_size,
                                                                    needs_reference)
                    if r_ids is not None:
                        prompts = worker.tokenizer.batch_decode(p_ids, skip_special_tokens=True)
                        responses = worker.tokenizer.batch_decode(r_ids, skip_special_tokens=True)
                rewards = scorer.submit(_Job(prompts, responses, refs, r_ids), cfg.request_timeout_s) \
                    if responses else []
                with metrics.lock:
                    metrics.requests += 1
                    metrics.samples += len(rewards)
                    metrics.latency_sum += time.perf_counter() - t0
                # OpenRLHF reads 'rewards' for the advantage and 'scores' for its dynamic filtering.
                self._send(200, {"rewards": rewards} if path == "/score" else
                           {"rewards": rewards, "scores": rewards, "extra_logs": {}})
            except RequestError as e:
                with metrics.lock:
                    metrics.errors += 1
                self._send(e.status, {"error": str(e)})

    return _BoundedServer((cfg.host, cfg.port), Handler, cfg.max_connections, metrics)
