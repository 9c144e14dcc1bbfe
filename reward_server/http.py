"""HTTP front of the reward server: `oirl serve-reward`.

    POST /score    {"prompts": [...], "responses": [...], "references": [...]?}   -> {"rewards": [...]}
                   or {"prompt_token_ids": [[...]], "response_token_ids": [[...]]} (decoded with the policy tokenizer)
    GET  /health   -> {"status": "ok"}
    GET  /metrics  -> Prometheus text: requests, errors, samples scored, batches, latency

JSON only, never pickle. Concurrent requests are batched: a scoring thread takes every queued request (up to
``max_batch_samples``) and scores them in one call. Limits: request body size, samples per request, and a per-request
timeout; violations get a 4xx/5xx with a message and the server keeps serving. It binds 127.0.0.1 by default and
refuses to start on any other address without a bearer token; with a token, every request must carry it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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


class _Job:
    def __init__(self, prompts, responses, references, response_ids):
        self.args = (prompts, responses, references, response_ids)
        self.done = threading.Event()
        self.result: Any = None
        self.error: Exception | None = None


class BatchingScorer:
    """One thread scores queued requests together; callers wait on their own event with a timeout."""

    def __init__(self, worker: Any, max_batch: int, wait_s: float):
        self.worker, self.max_batch, self.wait_s = worker, max_batch, wait_s
        self.queue: queue.Queue[_Job] = queue.Queue()
        self.batches = 0
        self.thread = threading.Thread(target=self._loop, daemon=True, name="reward-batcher")
        self.thread.start()

    def submit(self, job: _Job, timeout: float) -> Any:
        self.queue.put(job)
        if not job.done.wait(timeout):
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
            self._score(jobs)

    def _score(self, jobs: list[_Job]) -> None:
        prompts, responses, refs, ids = [], [], [], []
        have_ids = all(j.args[3] is not None for j in jobs)
        for j in jobs:
            prompts += j.args[0]
            responses += j.args[1]
            refs += j.args[2]
            ids += j.args[3] or []
        try:
            rewards = self.worker.score_texts(prompts, responses, refs, ids if have_ids else None).tolist()
            self.batches += 1
            start = 0
            for j in jobs:
                j.result = rewards[start: start + len(j.args[1])]
                start += len(j.args[1])
        except Exception as e:  # one bad batch fails its requests, not the server
            for j in jobs:
                j.error = RequestError(422, str(e))
        for j in jobs:
            j.done.set()


def _parse(body: dict, cfg: ServerConfig, tokenizer: Any) -> tuple[list, list, list, list | None]:
    if not isinstance(body, dict):
        raise RequestError(400, "body must be a JSON object")
    ids = None
    if "responses" in body:
        prompts, responses = body.get("prompts"), body["responses"]
        for name, val in (("prompts", prompts), ("responses", responses)):
            if not isinstance(val, list) or not all(isinstance(x, str) for x in val):
                raise RequestError(400, f"'{name}' must be a list of strings")
    elif "response_token_ids" in body:
        p_ids, ids = body.get("prompt_token_ids"), body["response_token_ids"]
        for name, val in (("prompt_token_ids", p_ids), ("response_token_ids", ids)):
            if not isinstance(val, list) or not all(isinstance(x, list) and all(isinstance(t, int) for t in x)
                                                    for x in val):
                raise RequestError(400, f"'{name}' must be a list of lists of integer token ids")
        prompts = tokenizer.batch_decode(p_ids, skip_special_tokens=True)
        responses = tokenizer.batch_decode(ids, skip_special_tokens=True)
    else:
        raise RequestError(400, "give 'prompts' and 'responses' (strings) or 'prompt_token_ids' and "
                                "'response_token_ids'")
    refs = body.get("references", [""] * len(responses))
    if not isinstance(refs, list) or not all(isinstance(x, str) for x in refs):
        raise RequestError(400, "'references' must be a list of strings")
    if not len(prompts) == len(responses) == len(refs):
        raise RequestError(400, f"{len(prompts)} prompts, {len(responses)} responses, {len(refs)} references: "
                                "give one of each per sample")
    if len(responses) > cfg.max_samples_per_request:
        raise RequestError(413, f"{len(responses)} samples in one request; the limit is "
                                f"{cfg.max_samples_per_request}: split the request")
    return prompts, responses, refs, ids


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = self.errors = self.samples = 0
        self.latency_sum = 0.0

    def render(self, batches: int) -> str:
        with self.lock:
            return (f"oirl_reward_requests_total {self.requests}\noirl_reward_errors_total {self.errors}\n"
                    f"oirl_reward_samples_total {self.samples}\noirl_reward_batches_total {batches}\n"
                    f"oirl_reward_latency_seconds_sum {self.latency_sum:.6f}\n")


def make_server(worker: Any, cfg: ServerConfig) -> ThreadingHTTPServer:
    """Build (not start) the server; raises before binding when a non-loopback host has no token."""
    if not is_loopback(cfg.host) and not cfg.token:
        raise ValueError(f"refusing to serve rewards on {cfg.host} without a token: pass --token (clients send "
                         "'Authorization: Bearer <token>') or bind 127.0.0.1")
    scorer = BatchingScorer(worker, cfg.max_batch_samples, cfg.batch_wait_s)
    metrics = Metrics()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = cfg.request_timeout_s  # socket timeout: a stalled client cannot hold a thread forever

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if not cfg.token:
                return True
            got = self.headers.get("Authorization", "")
            return hmac.compare_digest(got.encode(), f"Bearer {cfg.token}".encode())

        def do_GET(self) -> None:
            if not self._authorized():
                return self._send(401, {"error": "missing or wrong bearer token"})
            if self.path == "/health":
                return self._send(200, {"status": "ok"})
            if self.path == "/metrics":
                return self._send(200, metrics.render(scorer.batches), "text/plain; version=0.0.4")
            self._send(404, {"error": f"no route GET {self.path}; use /health, /metrics or POST /score"})

        def do_POST(self) -> None:
            t0 = time.perf_counter()
            try:
                if not self._authorized():
                    raise RequestError(401, "missing or wrong bearer token")
                if self.path != "/score":
                    raise RequestError(404, f"no route POST {self.path}; use POST /score")
                if not self.headers.get("Content-Type", "").startswith("application/json"):
                    raise RequestError(415, "send JSON with Content-Type: application/json")
                length = int(self.headers.get("Content-Length") or -1)
                if length < 0:
                    raise RequestError(411, "Content-Length is required")
                if length > cfg.max_body_bytes:
                    self.close_connection = True  # do not read an oversized body
                    raise RequestError(413, f"body of {length} bytes exceeds the limit of {cfg.max_body_bytes}")
                try:
                    body = json.loads(self.rfile.read(length))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise RequestError(400, f"body is not valid JSON: {e}") from e
                prompts, responses, refs, ids = _parse(body, cfg, worker.tokenizer)
                rewards = scorer.submit(_Job(prompts, responses, refs, ids), cfg.request_timeout_s)
                with metrics.lock:
                    metrics.requests += 1
                    metrics.samples += len(rewards)
                    metrics.latency_sum += time.perf_counter() - t0
                self._send(200, {"rewards": rewards})
            except RequestError as e:
                with metrics.lock:
                    metrics.errors += 1
                self._send(e.status, {"error": str(e)})

    server = ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    server.daemon_threads = True
    return server
