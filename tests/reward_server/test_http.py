"""The reward server over real HTTP on loopback: scoring, batching, limits, malformed input (named 4xx errors and
a seeded fuzz of a few hundred malformed requests), isolation between batched requests, bounded connections, slow
clients, normalisation statistics left alone, auth, and the real `oirl serve-reward` CLI."""

import collections
import http.client
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from malformed import malformed_requests, request, send

from oirl.config import REPO_ROOT
from reward_server.http import ServerConfig, make_server
from reward_server.reward_worker import RewardConfig, RewardWorker

NOT_FINITE = float("nan")


def nan_for_bad(prompt, response, reference):  # a user reward function, imported by path in a test
    return NOT_FINITE if "bad" in response else 0.0


@pytest.fixture(scope="module")
def worker(tiny_model_path):
    return RewardWorker(RewardConfig(kind="gsm8k", format_bonus=0.5), tiny_model_path)


def serve(worker, **kw):
    server = make_server(worker, ServerConfig(**{"host": "127.0.0.1", "port": 0, "batch_wait_s": 0.05, **kw}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def call(url, path, body=None, token=None, content_type="application/json", raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if r.headers["Content-Type"].startswith("application/json") else text)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(worker):
    srv, url = serve(worker, max_body_bytes=4096, max_samples_per_request=8)
    yield url
    srv.shutdown()


def test_score_text_and_token_ids(server, worker):
    status, out = call(server, "/score", {"prompts": ["q1", "q2", "q3"], "references": ["7", "7", "3"],
                                          "responses": ["so #### 7", "it is 7", "no idea"]})
    assert status == 200 and out["rewards"] == [1.5, 1.25, 0.0]
    ids = worker.tokenizer("12 34", add_special_tokens=False)["input_ids"]
    status, out = call(server, "/score", {"prompt_token_ids": [[1, 2]], "response_token_ids": [ids],
                                          "references": ["34"]})
    assert status == 200 and out["rewards"] == [1.25]
    assert call(server, "/health") == (200, {"status": "ok"})


GOOD = {"prompts": ["q"], "responses": ["#### 1"], "references": ["1"]}
TXT = {"prompts": ["a", "b"], "responses": ["x", "y"], "references": ["1", "2"]}
IDS = {"prompt_token_ids": [[1, 2], [3]], "response_token_ids": [[4], [5, 6, 7]], "references": ["1", "2"]}


@pytest.mark.parametrize("body, raw, ctype, status, fragment", [
    (None, b"{not json", "application/json", 400, "not valid JSON"),
    (None, b'{"prompts": ["\xff"]}', "application/json", 400, "not UTF-8"),
    (None, b'{"prompts": [NaN]}', "application/json", 400, "NaN is not a JSON value"),
    (None, b"[" * 1500 + b"]" * 1500, "application/json", 400, "nested too deeply"),
    ([TXT], None, "application/json", 400, "body must be a JSON object, got list"),
    ({"prompts": ["a"]}, None, "application/json", 400, "missing field 'responses'"),
    ({"responses": ["x"], "references": ["1"]}, None, "application/json", 400, "missing field 'prompts'"),
    ({}, None, "application/json", 400, "not neither"),
    ({**TXT, "response_token_ids": [[1]]}, None, "application/json", 400, "not both"),
    ({**TXT, "reference": ["1", "2"]}, None, "application/json", 400, "unknown field 'reference'"),
    ({"prompts": ["a", "b"], "responses": ["x"], "references": ["1", "2"]}, None, "application/json", 400,
     "2 prompts, 1 responses, 2 references: give one of each per sample"),
    ({**TXT, "prompts": "ab"}, None, "application/json", 400, "'prompts' must be a list (one string per sample), "
                                                              "got str"),
    ({**TXT, "responses": ["x", 7]}, None, "application/json", 400, "responses[1] must be a string, got int"),
    ({**TXT, "references": ["1", None]}, None, "application/json", 400, "references[1] must be a string, got "
                                                                       "NoneType"),
    ({"prompts": ["a"], "responses": ["x"]}, None, "application/json", 400, "missing field 'references': "
                                                                           "reward.kind=gsm8k"),
    ({**TXT, "references": ["1", "seventy"]}, None, "application/json", 400,
     "references[1]: GSM8K reference 'seventy' is not a number"),
    ({**IDS, "response_token_ids": [[4], [5, -3, 7]]}, None, "application/json", 400,
     "response_token_ids[1][1] = -3 is outside the tokenizer's vocabulary [0, 512)"),
    ({**IDS, "prompt_token_ids": [[1, 512], [3]]}, None, "application/json", 400,
     "prompt_token_ids[0][1] = 512 is outside the tokenizer's vocabulary [0, 512)"),
    ({**IDS, "response_token_ids": [[4], [10**40]]}, None, "application/json", 400,
     "response_token_ids[1][0] = 1000000000000000000000000000000000000... is outside"),
    ({**IDS, "response_token_ids": [[4], [5.0]]}, None, "application/json", 400,
     "response_token_ids[1][0] = 5.0 is not an integer token id"),
    ({**IDS, "response_token_ids": [[4], [True]]}, None, "application/json", 400,
     "response_token_ids[1][0] = True is not an integer token id"),
    ({**IDS, "prompt_token_ids": [[1], 3]}, None, "application/json", 400,
     "prompt_token_ids[1] must be a list of integer token ids, got int"),
    ({**IDS, "prompt_token_ids": [[1]]}, None, "application/json", 400, "1 prompt_token_ids, 2 response_token_ids"),
    ({"prompts": ["a"] * 9, "responses": ["x"] * 9, "references": ["1"] * 9}, None, "application/json", 413,
     "limit is 8"),
    (None, b"x" * 5000, "application/json", 413, "exceeds the limit of 4096"),
    ({"prompts": ["a"], "responses": ["x"], "references": ["1"]}, None, "text/plain", 415, "send JSON"),
], ids=lambda v: v[:20].decode("latin-1") if isinstance(v, bytes) else None)
def test_bad_requests_get_4xx_naming_the_field_and_server_keeps_serving(server, body, raw, ctype, status, fragment):
    got, out = call(server, "/score", body, raw=raw, content_type=ctype)
    assert got == status and fragment in out["error"], out
    ok, out = call(server, "/score", GOOD)
    assert ok == 200 and out["rewards"] == [1.5]


def port_of(url):
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("data, status, fragment", [
    (request("POST", "/score", b"{}", [("Content-Type", "application/json")], content_length="2x"), 400,
     "Content-Length '2x' must be one non-negative integer"),
    (request("POST", "/score", b"{}", [("Content-Type", "application/json")], content_length="-2"), 400,
     "Content-Length '-2'"),
    (request("POST", "/score", b"{}", [("Content-Type", "application/json")], content_length=None), 411,
     "Content-Length is required"),
    (request("PUT", "/score", b"{}"), 405, "method 'PUT' not allowed"),
    (b"nonsense\r\n\r\n", 400, "Bad request syntax"),
    (b"GET /health HTTP/0.9\r\n\r\n", 400, "HTTP/0.9 requests are not served"),
])
def test_malformed_http_gets_a_json_4xx(server, data, status, fragment):
    got, headers, body = send(port_of(server), data)
    assert got == status and headers["Content-Type"] == "application/json"
    assert fragment in json.loads(body)["error"]


def test_fuzz_every_malformed_request_gets_a_4xx_json_and_the_server_keeps_serving(worker):
    """Stalled requests (cut in the request line or headers) wait out the 1 s read timeout concurrently, holding
    their connections, while the other cases are sent one after another; each stalled one gets 408."""
    srv, url = serve(worker, max_body_bytes=4096, max_samples_per_request=8, read_timeout_s=1.0)
    cases = malformed_requests(seed=11, count=300, vocab=len(worker.tokenizer), max_samples=8, stalls=True)
    stalled = [c for c in cases if c[0].startswith("stall:")]
    assert 0 < len(stalled) < ServerConfig.max_connections - 1  # they all fit beside the sequential ones
    seen = collections.Counter()

    def check(label, data, half_close):
        status, headers, body = send(port_of(url), data, half_close)
        assert 400 <= status < 500, (label, status, body[:200])
        assert headers.get("Content-Type") == "application/json", (label, headers)
        error = json.loads(body)["error"]
        assert isinstance(error, str) and error, label
        if label.startswith("stall:"):
            assert status == 408 and error == "request line and headers not received within 1.0s", (label, error)
        return status

    try:
        with ThreadPoolExecutor(len(stalled)) as pool:
            waiting = [pool.submit(check, *case) for case in stalled]
            for case in cases:
                if not case[0].startswith("stall:"):
                    seen[check(*case)] += 1
            for f in waiting:
                seen[f.result()] += 1
        assert set(seen) >= {400, 404, 405, 408, 411, 413, 415, 431}, seen  # every kind of check is reached
        assert call(url, "/health") == (200, {"status": "ok"})
        assert call(url, "/score", GOOD) == (200, {"rewards": [1.5]})
    finally:
        srv.shutdown()


def test_a_request_begun_gets_408_and_an_idle_connection_is_closed_without_one(worker):
    """The read timeout answers a request that began (408, on a fresh or a kept-alive connection) and closes a
    connection on which none began: there is no request to answer, and a kept-alive client could read a 408 sent
    then as the answer to its next request."""
    srv, url = serve(worker, read_timeout_s=1.0)
    health = request("GET", "/health")

    def kept_alive(then: bytes) -> bytes:
        with raw_connect(url) as sock:
            sock.sendall(health)
            first = http.client.HTTPResponse(sock)
            first.begin()
            assert first.status == 200 and first.getheader("Connection") != "close"
            first.read()
            sock.sendall(then)
            return recv_all(sock)

    def fresh(data: bytes) -> bytes:
        with raw_connect(url) as sock:
            sock.sendall(data)
            return recv_all(sock)

    try:
        with ThreadPoolExecutor(4) as pool:  # each waits out the read timeout: together, once
            begun_fresh = pool.submit(fresh, b"GET /heal")
            begun_kept = pool.submit(kept_alive, b"GET /health HTTP/1.1\r\nHost: x\r\n")
            idle_fresh = pool.submit(fresh, b"")
            idle_kept = pool.submit(kept_alive, b"")
            for answer in (begun_fresh.result(), begun_kept.result()):
                assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer[:200]
                body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
                assert body == {"error": "request line and headers not received within 1.0s"}
            assert idle_fresh.result() == b"" and idle_kept.result() == b""
    finally:
        srv.shutdown()


def recv_all(sock) -> bytes:
    """Everything the server sends until it closes the connection (a reset after it, when the client had sent bytes
    the server never read, ends it too)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def bad_in_response(prompt, response, reference):  # a user reward function: NaN for one client's rows
    return NOT_FINITE if "bad" in response else float(len(response))


def test_a_nan_request_fails_alone_when_batched_with_others(tiny_model_path):
    w = RewardWorker(RewardConfig(kind="none", function="test_http:bad_in_response"), tiny_model_path)
    srv, url = serve(w, batch_wait_s=0.5)
    bodies = [{"prompts": ["p"], "responses": [f"private text of client {c}"]} for c in "ABC"]
    bodies.append({"prompts": ["p", "p"], "responses": ["fine D", "bad row of client D"]})
    barrier = threading.Barrier(len(bodies))

    def post(body):
        barrier.wait()
        return call(url, "/score", body)

    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            results = list(pool.map(post, bodies))
        for body, (status, out) in zip(bodies[:3], results[:3]):
            assert status == 200 and out["rewards"] == [float(len(body["responses"][0]))]
        status, out = results[3]
        assert status == 422 and "reward of sample 1 is nan" in out["error"] and "bad row of client D" in out["error"]
        assert "private text" not in out["error"]  # never another client's text
        _, metrics = call(url, "/metrics")
        values = dict(line.split() for line in metrics.strip().splitlines())
        assert int(values["oirl_reward_split_batches_total"]) == 1  # they were scored together, then apart
    finally:
        srv.shutdown()


def test_a_request_past_its_timeout_gets_504_and_is_never_scored_late(tiny_model_path):
    """request_timeout_s: a client waits no longer than that (504), and a request that timed out while queued is
    dropped by the scorer instead of delaying every request after it."""
    w = RewardWorker(RewardConfig(kind="none", function="slow_reward:slow_if_asked"), tiny_model_path)
    srv, url = serve(w, request_timeout_s=0.5, batch_wait_s=0.0)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call, url, "/score", {"prompts": ["p"], "responses": ["slow A"]})
            time.sleep(0.2)  # A is being scored (1 s); B waits in the queue behind it
            second = pool.submit(call, url, "/score", {"prompts": ["p"], "responses": ["slow B"]})
            for f in (first, second):
                status, out = f.result()
                assert status == 504 and "scoring did not finish within 0.5s" in out["error"]
        time.sleep(1.0)  # A is done by now; B, cancelled, must not take the scorer for another second
        t0 = time.monotonic()
        assert call(url, "/score", {"prompts": ["p"], "responses": ["quick"]}) == (200, {"rewards": [5.0]})
        assert time.monotonic() - t0 < 0.5
        _, metrics = call(url, "/metrics")
        values = dict(line.split() for line in metrics.strip().splitlines())
        assert int(values["oirl_reward_batches_total"]) == 2  # A and the quick one; never B
    finally:
        srv.shutdown()


def test_http_scoring_never_updates_normalisation_statistics(tiny_model_path):
    w = RewardWorker(RewardConfig(kind="gsm8k", format_bonus=0.5, normalize=True), tiny_model_path)
    w.score_texts(["q"] * 4, ["#### 7", "7", "no", "#### 3"], ["7"] * 4)  # a trainer's batch: moments move
    before = {"count": w.moments.count, "mean": w.moments.mean, "m2": w.moments.m2}
    srv, url = serve(w)
    try:
        for _ in range(3):
            status, out = call(url, "/score", {"prompts": ["q"] * 2, "responses": ["#### 9", "#### 9"],
                                               "references": ["9", "9"]})
            assert status == 200
            raw = np.array([1.5, 1.5])
            np.testing.assert_allclose(out["rewards"], (raw - before["mean"]) / w.moments.std, rtol=1e-6)
        assert {"count": w.moments.count, "mean": w.moments.mean, "m2": w.moments.m2} == before
    finally:
        srv.shutdown()


def raw_connect(url):
    return socket.create_connection(("127.0.0.1", port_of(url)), timeout=30)


def test_a_stalled_or_trickling_client_cannot_hold_the_server(worker):
    srv, url = serve(worker, read_timeout_s=1.0, max_connections=4)
    stalled, trickle = raw_connect(url), raw_connect(url)
    done = threading.Event()

    def trickle_bytes():
        for b in request("POST", "/score", json.dumps(GOOD).encode(), [("Content-Type", "application/json")]):
            if done.is_set():
                return
            try:
                trickle.send(bytes([b]))
            except OSError:
                return
            time.sleep(0.1)

    try:
        t0 = time.monotonic()
        stalled.sendall(request("POST", "/score", b'{"prompts": [', [("Content-Type", "application/json")],
                                content_length="100"))  # headers, then a body that never completes
        threading.Thread(target=trickle_bytes, daemon=True).start()
        while time.monotonic() - t0 < 1.5:  # meanwhile other clients are served at once
            t = time.monotonic()
            assert call(url, "/score", GOOD) == (200, {"rewards": [1.5]})
            assert time.monotonic() - t < 1.0
        answer = stalled.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"body not received within 1.0s" in answer
        trickle.settimeout(5)
        answer = recv_all(trickle)  # cut at the deadline, long before its ~20 s of trickling ends
        assert answer.startswith(b"HTTP/1.1 408") and b"line and headers not received within 1.0s" in answer
        assert time.monotonic() - t0 < 4.0
    finally:
        done.set()
        stalled.close()
        trickle.close()
        srv.shutdown()


def test_connections_are_bounded_and_one_more_gets_503_at_once(worker):
    srv, url = serve(worker, read_timeout_s=2.0, max_connections=2)
    holders = [raw_connect(url) for _ in range(2)]
    try:
        for h in holders:
            h.sendall(b"POST /score HTTP/1.1\r\nContent-Type: application/json\r\n")  # headers never end
        time.sleep(0.3)
        t = time.monotonic()
        status, headers, body = send(port_of(url), request("GET", "/health"))
        assert status == 503 and "all 2 connections in use" in json.loads(body)["error"]
        assert headers["Retry-After"] == "1" and time.monotonic() - t < 1.0
        deadline = time.monotonic() + 6.0  # the holders are cut at their read deadline; then service resumes
        while True:
            status, _, _ = send(port_of(url), request("GET", "/health"))
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200
        _, metrics = call(url, "/metrics")
        assert int(dict(line.split() for line in metrics.strip().splitlines())["oirl_reward_busy_total"]) >= 1
    finally:
        for h in holders:
            h.close()
        srv.shutdown()


def test_concurrent_requests_are_batched(worker):
    srv, url = serve(worker)
    try:
        bodies = [{"prompts": ["q"] * 4, "responses": [f"#### {i}"] * 4, "references": [str(i % 2)] * 4}
                  for i in range(24)]
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda b: call(url, "/score", b), bodies))
        for i, (status, out) in enumerate(results):
            assert status == 200 and out["rewards"] == [1.5 if i in (0, 1) else 0.5] * 4
        _, metrics = call(url, "/metrics")
        values = dict(line.split() for line in metrics.strip().splitlines())
        assert int(values["oirl_reward_requests_total"]) == 24
        assert int(values["oirl_reward_samples_total"]) == 96
        assert int(values["oirl_reward_batches_total"]) < 24  # several requests shared a scoring call
    finally:
        srv.shutdown()


def test_token_is_required_when_set(worker):
    srv, url = serve(worker, token="s3cret")
    try:
        body = {"prompts": ["q"], "responses": ["#### 2"], "references": ["2"]}
        assert call(url, "/score", body)[0] == 401
        assert call(url, "/score", body, token="wrong")[0] == 401
        assert call(url, "/health")[0] == 401
        assert call(url, "/score", body, token="s3cret") == (200, {"rewards": [1.5]})
    finally:
        srv.shutdown()


def no_token_env():
    return {k: v for k, v in os.environ.items() if k != "OIRL_REWARD_TOKEN"}


def oirl(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "oirl.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env or no_token_env())


def test_non_loopback_without_token_refuses_to_start(worker):
    with pytest.raises(ValueError, match="without a token"):
        make_server(worker, ServerConfig(host="0.0.0.0", port=0))
    for config in ("configs/smoke.yaml", "configs/demo.yaml"):
        t0 = time.monotonic()
        proc = oirl("serve-reward", "--config", config, "--host", "0.0.0.0", "--port", "0")
        assert proc.returncode == 2 and "without a token" in proc.stderr and "--token-file" in proc.stderr
        assert time.monotonic() - t0 < 60  # refused before any model is built or converted


def test_serve_reward_refuses_a_token_on_the_command_line():
    proc = oirl("serve-reward", "--config", "configs/smoke.yaml", "--port", "0", "--token", "cmdline-s3cret")
    assert proc.returncode == 2 and "--token is not accepted" in proc.stderr and "--token-file" in proc.stderr
    assert "cmdline-s3cret" not in proc.stdout + proc.stderr


def test_serve_reward_with_a_missing_reward_model_exits_at_once_offline():
    # A hub endpoint that refuses connections: any attempt to reach the network would show up as another error.
    env = dict(no_token_env(), HF_ENDPOINT="http://127.0.0.1:9")
    t0 = time.monotonic()
    proc = oirl("serve-reward", "--config", "configs/demo.yaml", "reward.model_path=/nonexistent", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "reward.model_path='/nonexistent' is not a model folder" in proc.stderr
    assert "oirl train-rm" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60


def test_nan_reward_is_an_error_naming_the_sample(tiny_model_path):
    w = RewardWorker(RewardConfig(kind="none", function="test_http:nan_for_bad"), tiny_model_path)
    with pytest.raises(ValueError, match="reward of sample 1 is nan"):
        w.score_texts(["p", "p"], ["fine", "bad one"])
    srv, url = serve(w)
    try:
        status, out = call(url, "/score", {"prompts": ["p", "p"], "responses": ["fine", "bad"]})
        assert status == 422 and "sample 1" in out["error"]
        assert call(url, "/score", {"prompts": ["p"], "responses": ["fine"]}) == (200, {"rewards": [0.0]})
    finally:
        srv.shutdown()


def test_backends_combine_with_weights_normalise_and_clip(server, tiny_model_path):
    responses, refs = ["#### 7", "7", "nothing", "#### 3"], ["7", "7", "7", "7"]
    local = RewardWorker(RewardConfig(kind="gsm8k", format_bonus=0.5), tiny_model_path)
    base = local.score_texts(["q"] * 4, responses, refs)
    np.testing.assert_allclose(base, [1.5, 1.25, 0.0, 0.5])
    # Remote backend (the test server, same rule) at weight 2 plus the local rule at weight 1 = 3x.
    combo = RewardWorker(RewardConfig(kind="gsm8k", format_bonus=0.5, url=server, url_weight=2.0), tiny_model_path)
    np.testing.assert_allclose(combo.score_texts(["q"] * 4, responses, refs), 3 * base, rtol=1e-6)
    norm = RewardWorker(RewardConfig(kind="gsm8k", format_bonus=0.5, normalize=True, clip=1.0), tiny_model_path)
    out = norm.score_texts(["q"] * 4, responses, refs)
    z = (base - base.mean()) / base.std()
    np.testing.assert_allclose(out, np.clip(z, -1, 1), rtol=1e-5)
    assert math.isclose(norm.stats()["running_mean"], float(base.mean()), rel_tol=1e-6)


GSM8K_ANSWER = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"


def test_serve_reward_cli_end_to_end(tmp_path):
    """`oirl serve-reward --config configs/demo.yaml` (its GSM8K rule reward) on loopback, with the tiny model's
    tokenizer instead of SmolLM2's (model.path=tiny: the rule does not depend on it, and this skips a ~70 s
    conversion on a fresh machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token_file = tmp_path / "token"
    token_file.write_text("t0k-from-a-file\n")
    proc = subprocess.Popen([sys.executable, "-m", "oirl.cli", "serve-reward", "--config", "configs/demo.yaml",
                             "model.path=tiny", "--port", str(port), "--token-file", str(token_file)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=no_token_env())
    url, token = f"http://127.0.0.1:{port}", "t0k-from-a-file"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if call(url, "/health", token=token)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert proc.poll() is None and time.time() < deadline, "serve-reward did not come up"
            time.sleep(0.5)
        responses = ["She sold 72 clips.\n#### 72", "She sold 71 clips.\n#### 71"]  # correct, wrong
        for refs in (["72", "72"], [GSM8K_ANSWER, GSM8K_ANSWER]):
            status, out = call(url, "/score", {"prompts": ["How many clips?"] * 2, "responses": responses,
                                               "references": refs}, token=token)
            assert status == 200 and out["rewards"] == [1.5, 0.5]  # demo.yaml: format_bonus 0.5
        assert call(url, "/score", {"prompts": ["x"], "responses": ["y"], "references": ["1"]})[0] == 401
        cases = malformed_requests(seed=5, count=150, vocab=512, max_samples=1024,
                                   auth=[("Authorization", f"Bearer {token}")])
        for label, data, half_close in cases:
            status, headers, body = send(port, data, half_close)
            assert 400 <= status < 500 and "error" in json.loads(body), (label, status, body[:200])
        assert call(url, "/health", token=token) == (200, {"status": "ok"})
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert token not in output  # never printed


@pytest.mark.slow
def test_driver_scores_through_a_remote_reward_server(tmp_path, tiny_model_path):
    """PPO whose only reward backend is a reward server reached over HTTP (reward.url)."""
    if os.environ.get("OIRL_IN_LOOPBACK_NS") != "1":
        pytest.skip("starts Ray: run under deploy/loopback.sh")
    w = RewardWorker(RewardConfig(kind="synthetic_digits"), tiny_model_path)
    srv, url = serve(w, token="ppo-token")
    try:
        out = tmp_path / "remote"
        # The token reaches the reward actor through the environment (the embedded Ray cluster inherits it).
        proc = subprocess.run([sys.executable, "-m", "oirl.cli", "train", "--config", "configs/smoke.yaml",
                               "--out", str(out), "--no-progress", "iterations=2", "reward.kind=none",
                               f"reward.url={url}"], env=dict(os.environ, OIRL_REWARD_TOKEN="ppo-token"),
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2
        _, metrics = call(url, "/metrics", token="ppo-token")
        values = dict(line.split() for line in metrics.strip().splitlines())
        assert int(values["oirl_reward_samples_total"]) == 2 * rows[0]["rollout/samples"]
        assert "ppo-token" not in (out / "config.json").read_text()
    finally:
        srv.shutdown()
