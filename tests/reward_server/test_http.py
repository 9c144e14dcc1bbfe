"""The reward server over real HTTP on loopback: scoring, batching, limits, malformed input, auth, and the CLI."""

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
    server = make_server(worker, ServerConfig(host="127.0.0.1", port=0, batch_wait_s=0.05, **kw))
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


@pytest.mark.parametrize("body, raw, ctype, status, fragment", [
    (None, b"{not json", "application/json", 400, "not valid JSON"),
    ({"prompts": ["a"]}, None, "application/json", 400, "give 'prompts' and 'responses'"),
    ({"prompts": ["a", "b"], "responses": ["x"]}, None, "application/json", 400, "one of each per sample"),
    ({"prompts": [1], "responses": ["x"]}, None, "application/json", 400, "'prompts' must be a list of strings"),
    ({"prompts": ["a"] * 9, "responses": ["x"] * 9}, None, "application/json", 413, "limit is 8"),
    (None, b"x" * 5000, "application/json", 413, "exceeds the limit of 4096"),
    ({"prompts": ["a"], "responses": ["x"]}, None, "text/plain", 415, "send JSON"),
])
def test_bad_requests_get_4xx_and_server_keeps_serving(server, body, raw, ctype, status, fragment):
    got, out = call(server, "/score", body, raw=raw, content_type=ctype)
    assert got == status and fragment in out["error"]
    ok, out = call(server, "/score", {"prompts": ["q"], "responses": ["#### 1"], "references": ["1"]})
    assert ok == 200 and out["rewards"] == [1.5]


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


def test_non_loopback_without_token_refuses_to_start(worker):
    with pytest.raises(ValueError, match="without a token"):
        make_server(worker, ServerConfig(host="0.0.0.0", port=0))
    proc = subprocess.run([sys.executable, "-m", "oirl.cli", "serve-reward", "--config", "configs/smoke.yaml",
                           "--host", "0.0.0.0", "--port", "0"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k != "OIRL_REWARD_TOKEN"})
    assert proc.returncode == 2 and "without a token" in proc.stderr


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


def test_serve_reward_cli_end_to_end(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "oirl.cli", "serve-reward", "--config", "configs/smoke.yaml",
                             "--port", str(port), "--token", "t0k"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if call(url, "/health", token="t0k")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert proc.poll() is None and time.time() < deadline, "serve-reward did not come up"
            time.sleep(0.5)
        status, out = call(url, "/score", {"prompts": ["Say some digits: 1"], "responses": ["12 34"]}, token="t0k")
        assert status == 200 and len(out["rewards"]) == 1 and 0.0 <= out["rewards"][0] <= 1.0
        assert call(url, "/score", {"prompts": ["x"], "responses": ["y"]})[0] == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_driver_scores_through_a_remote_reward_server(tmp_path, tiny_model_path):
    """PPO whose only reward backend is a reward server reached over HTTP (reward.url)."""
    if os.environ.get("OIRL_IN_LOOPBACK_NS") != "1":
        pytest.skip("starts Ray: run under deploy/loopback.sh")
    w = RewardWorker(RewardConfig(kind="synthetic_digits"), tiny_model_path)
    srv, url = serve(w, token="ppo-token")
    try:
        out = tmp_path / "remote"
        proc = subprocess.run([sys.executable, "-m", "oirl.cli", "train", "--config", "configs/smoke.yaml",
                               "--out", str(out), "--no-progress", "iterations=2", "reward.kind=none",
                               f"reward.url={url}", "reward.url_token=ppo-token"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2
        _, metrics = call(url, "/metrics", token="ppo-token")
        values = dict(line.split() for line in metrics.strip().splitlines())
        assert int(values["oirl_reward_samples_total"]) == 2 * rows[0]["rollout/samples"]
    finally:
        srv.shutdown()
