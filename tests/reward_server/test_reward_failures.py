"""A failed reward is never a 0, and a blip is not a failed run: every backend's transient failures (a reset or
refused connection, HTTP 429/502/503/504, an attempt that times out) are retried within reward.timeout_s; what still
fails is an error naming the sample (row, prompt_id), or with reward.on_failure=drop a sample that leaves the batch
(with its prompt group for GRPO/RLOO) and is counted in reward/failed. Remote failures come from a real HTTP server
on loopback that misbehaves on purpose; the drop path is also run through the real driver (`oirl train`)."""

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from oirl.batch import add_column, make_rollout_batch
from oirl.config import REPO_ROOT
from reward_server.failures import RewardFailure, drop_failed
from reward_server.reward_worker import RewardConfig, RewardWorker


class FlakyServer:
    """A reward server (reward = len(response)) whose first answers are failures from ``first``: 'close' (the
    connection closed without an answer), 'reset' (a TCP reset), 'stall' (an answer only after ``stall_s``) or an
    HTTP status; then ``always`` (None: rewards) for every later request. A request holding a response with 'poison'
    in it gets 500 every time. ``calls`` holds each request's responses, in order."""

    def __init__(self, first=(), always=None, stall_s=3.0, port=0, poison_first_row=False):
        self.first, self.always, self.stall_s = list(first), always, stall_s
        self.poison_first_row, self.poison = poison_first_row, None
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.answer(self, body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, handler, body):
        rows = list(zip(body["prompts"], body["responses"]))
        with self.lock:
            self.calls.append(body["responses"])
            k = len(self.calls) - 1
            if self.poison_first_row and len(rows) > 1 and k >= len(self.first):
                self.poison = rows[0]  # one sample of every batch fails for good
        action = self.first[k] if k < len(self.first) else self.always
        if action is None and (any("poison" in r for r in body["responses"]) or self.poison in rows):
            action = 500
        if action == "close":
            handler.close_connection = True
            return
        if action == "reset":
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.close()
            handler.close_connection = True
            return
        if action == "stall":
            time.sleep(self.stall_s)
            action = None
        status, payload = (200, {"rewards": [float(len(r)) for r in body["responses"]]}) if action is None else (
            action, {"error": f"failing on purpose with {action}"})
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if status == 429:
            handler.send_header("Retry-After", "1")
        handler.end_headers()
        handler.wfile.write(data)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def rollout(tokenizer, responses, prompt_ids=None, samples=None, references=None):
    """A RolloutBatch of these responses (prompt ids 10, 10, 11, 11, ... unless given) and its decoded texts."""
    n = len(responses)
    prompt_ids = prompt_ids or [10 + i // 2 for i in range(n)]
    samples = samples or [i % 2 for i in range(n)]
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    b = make_rollout_batch(prompt_ids, samples, [[1, 2]] * n, ids, [[0.0] * len(i) for i in ids], ["stop"] * n, 0)
    return add_column(b, "reference", references or [""] * n), tokenizer.batch_decode(ids, skip_special_tokens=True)


def remote(url, tiny_model_path, **kw):
    return RewardWorker(RewardConfig(kind="none", url=url, **{"timeout_s": 30.0, **kw}), tiny_model_path)


RESPONSES = ["one", "two two", "three 3 3", "four 4 4 4"]


# ---- remote HTTP: transient failures are retried ---------------------------------------------------------------


@pytest.mark.parametrize("first", [("close", 503), ("reset", 429), (502, 504)], ids=["close-503", "reset-429", "502-504"])
def test_transient_failures_of_a_remote_server_are_retried_then_scored(tokenizer, tiny_model_path, first):
    server = FlakyServer(first)
    try:
        batch, texts = rollout(tokenizer, RESPONSES)
        rewards, _, failed, _ = remote(server.url, tiny_model_path).score_batch(batch, None)
        np.testing.assert_array_equal(rewards, [float(len(t)) for t in texts])
        assert failed == {}
        assert len(server.calls) == len(first) + 1  # each failure once, then the answer
    finally:
        server.close()


def test_a_remote_attempt_that_times_out_is_retried(tokenizer, tiny_model_path):
    server = FlakyServer(["stall"], stall_s=5.0)
    try:
        batch, texts = rollout(tokenizer, RESPONSES)
        rewards, _, failed, _ = remote(server.url, tiny_model_path, attempt_timeout_s=0.5).score_batch(batch, None)
        np.testing.assert_array_equal(rewards, [float(len(t)) for t in texts])
        assert failed == {} and len(server.calls) >= 2
    finally:
        server.close()


def test_a_refused_connection_is_retried_until_the_server_is_up(tokenizer, tiny_model_path):
    """The server starts (on the port the actor was given) only once the actor has been refused and said it will
    retry: an event, not a sleep."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record):
            if "ConnectionRefusedError" in record.getMessage():
                refused.set()

    handler = Seen()
    logging.getLogger("reward_server.failures").addHandler(handler)
    servers = []
    try:
        def start_when_refused():
            assert refused.wait(60)
            servers.append(FlakyServer(port=port))

        starter = threading.Thread(target=start_when_refused, daemon=True)
        starter.start()
        batch, texts = rollout(tokenizer, RESPONSES)
        rewards, _, failed, _ = remote(f"http://127.0.0.1:{port}", tiny_model_path).score_batch(batch, None)
        np.testing.assert_array_equal(rewards, [float(len(t)) for t in texts])
        assert refused.is_set() and failed == {} and len(servers[0].calls) == 1
    finally:
        logging.getLogger("reward_server.failures").removeHandler(handler)
        for server in servers:
            server.close()


# ---- remote HTTP: what still fails is named, or dropped and counted ---------------------------------------------


def test_a_remote_server_that_keeps_failing_is_an_error_naming_the_samples(tokenizer, tiny_model_path):
    server = FlakyServer(always=503)
    try:
        batch, _ = rollout(tokenizer, RESPONSES[:3])
        with pytest.raises(RewardFailure) as err:
            remote(server.url, tiny_model_path, timeout_s=2.0).score_batch(batch, None)
        message = str(err.value)
        assert message.startswith("reward of 3 samples (row 0 (prompt_id 10, sample 0), row 1 (prompt_id 10, "
                                  "sample 1), row 2 (prompt_id 11, sample 0)) failed: reward server "), message
        assert f"answered 503: {json.dumps({'error': 'failing on purpose with 503'})}" in message
        assert "retry budget (reward.timeout_s) is spent" in message and "reward.on_failure=drop" in message
        assert len(server.calls) >= 2 and all(len(c) == 3 for c in server.calls)  # retried, never split

        # drop: every row failed, so nothing is left to train on, and that is an error too (never a 0)
        rewards, _, failed, _ = remote(server.url, tiny_model_path, timeout_s=1.0, on_failure="drop").score_batch(
            batch, None)
        assert sorted(failed) == [0, 1, 2] and np.isnan(rewards).all()
        assert failed[1].startswith("reward of row 1 (prompt_id 10, sample 1) failed: reward server ")
        with pytest.raises(RewardFailure, match=r"3 of 3 samples failed and no batch .* left to train on; the "
                                                r"first: reward of row 0 \(prompt_id 10, sample 0\) failed"):
            drop_failed(batch, rewards, failed, whole_groups=False, multiple=1)
    finally:
        server.close()


def test_a_sample_the_server_always_fails_on_is_named_or_dropped_alone(tokenizer, tiny_model_path):
    """A 500 on the batch is not retried; the rows are sent one by one to find the sample it fails on."""
    server = FlakyServer()
    try:
        batch, texts = rollout(tokenizer, ["one", "two two", "poison 3", "four 4 4 4"])
        with pytest.raises(RewardFailure) as err:
            remote(server.url, tiny_model_path).score_batch(batch, None)
        assert str(err.value).startswith(f"reward of row 2 (prompt_id 11, sample 0) failed: reward server "
                                         f"{server.url} answered 500: ")
        assert "not retried" in str(err.value)
        assert [len(c) for c in server.calls] == [4, 1, 1, 1]  # the batch, then rows 0, 1, 2 alone: 2 fails

        server.calls.clear()
        w = remote(server.url, tiny_model_path, on_failure="drop", normalize=True)
        rewards, state, failed, _ = w.score_batch(batch, None)
        assert [len(c) for c in server.calls] == [4, 1, 1, 1, 1]  # each once: a 500 is not retried
        assert list(failed) == [2] and "row 2 (prompt_id 11, sample 0)" in failed[2] and np.isnan(rewards[2])
        raw = np.array([len(texts[i]) for i in (0, 1, 3)], dtype=np.float64)
        np.testing.assert_allclose(rewards[[0, 1, 3]], (raw - raw.mean()) / raw.std(), rtol=1e-6)
        assert state["count"] == 3  # the failed sample is not in the normalisation moments

        kept, kept_rewards = drop_failed(batch, rewards, failed, whole_groups=False, multiple=1)
        assert kept.column("response_token_ids").to_pylist() == batch.take([0, 1, 3]).column(
            "response_token_ids").to_pylist()
        np.testing.assert_array_equal(kept_rewards, rewards[[0, 1, 3]])
        kept, _ = drop_failed(batch, rewards, failed, whole_groups=True, multiple=1)  # GRPO: prompt 11 leaves
        assert kept.column("prompt_id").to_pylist() == [10, 10]
    finally:
        server.close()


# ---- user function ---------------------------------------------------------------------------------------------

CALLS: dict[str, int] = {}


def flaky(prompt, response, reference):  # a user reward that calls a service: two resets, then answers
    CALLS["flaky"] = CALLS.get("flaky", 0) + 1
    if CALLS["flaky"] <= 2:
        raise ConnectionResetError("connection reset by peer")
    return float(len(response))


def buggy(prompt, response, reference):  # a bug that fires on one kind of response
    CALLS[response] = CALLS.get(response, 0) + 1
    return len(response) + (None if "poison" in response else 0)


def unreachable(prompt, response, reference):
    CALLS["unreachable"] = CALLS.get("unreachable", 0) + 1
    raise TimeoutError("the judge did not answer")


def function_worker(tiny_model_path, name, **kw):
    return RewardWorker(RewardConfig(kind="none", function=f"test_reward_failures:{name}", **kw), tiny_model_path)


def test_a_user_function_that_fails_transiently_is_retried(tokenizer, tiny_model_path):
    CALLS.clear()
    batch, texts = rollout(tokenizer, RESPONSES)
    rewards, _, failed, _ = function_worker(tiny_model_path, "flaky").score_batch(batch, None)
    np.testing.assert_array_equal(rewards, [float(len(t)) for t in texts])
    assert failed == {} and CALLS["flaky"] == len(RESPONSES) + 2


def test_a_bug_in_a_user_function_is_not_retried_and_names_the_sample(tokenizer, tiny_model_path):
    CALLS.clear()
    batch, texts = rollout(tokenizer, ["one", "poison 2", "three"])
    with pytest.raises(RewardFailure) as err:
        function_worker(tiny_model_path, "buggy").score_batch(batch, None)
    assert str(err.value).startswith("reward of row 1 (prompt_id 10, sample 1) failed: reward.function "
                                     "test_reward_failures:buggy raised TypeError: ")
    assert CALLS[texts[1]] == 1  # not retried: the same input gives the same bug

    rewards, _, failed, _ = function_worker(tiny_model_path, "buggy", on_failure="drop").score_batch(batch, None)
    assert list(failed) == [1] and "raised TypeError" in failed[1] and CALLS[texts[1]] == 2
    np.testing.assert_array_equal(rewards[[0, 2]], [len(texts[0]), len(texts[2])])


def test_a_user_function_that_keeps_timing_out_is_an_error_naming_the_sample(tokenizer, tiny_model_path):
    CALLS.clear()
    batch, _ = rollout(tokenizer, ["one", "two"])
    with pytest.raises(RewardFailure) as err:
        function_worker(tiny_model_path, "unreachable", timeout_s=1.5).score_batch(batch, None)
    assert str(err.value).startswith("reward of row 0 (prompt_id 10, sample 0) failed: reward.function "
                                     "test_reward_failures:unreachable: ")
    assert "the last with TimeoutError: the judge did not answer" in str(err.value) and CALLS["unreachable"] >= 2


# ---- learned reward model and rule -----------------------------------------------------------------------------


def test_a_reward_model_failure_names_the_sample(tokenizer, tiny_model_path, tmp_path):
    """A Llama reward model saved without a pad token cannot batch (nor, in transformers, pad one row): each row is
    tried alone, and the error names the first, with the library's message."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_path, num_labels=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    rm_tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    rm_tokenizer.pad_token = None
    rm_tokenizer.save_pretrained(tmp_path)
    batch, _ = rollout(tokenizer, ["one", "two"])
    w = RewardWorker(RewardConfig(kind="none", model_path=str(tmp_path)), tiny_model_path)
    with pytest.raises(RewardFailure) as err:
        w.score_batch(batch, None)
    assert str(err.value).startswith(f"reward of row 0 (prompt_id 10, sample 0) failed: reward model {tmp_path} "
                                     "raised ValueError: Asking to pad")


def test_a_rule_failure_names_the_sample_and_drop_leaves_it_out(tokenizer, tiny_model_path):
    batch, _ = rollout(tokenizer, ["#### 7", "#### 8", "#### 9"], references=["7", "eight", "9"])
    with pytest.raises(RewardFailure, match=r"^reward of row 1 \(prompt_id 10, sample 1\) failed: reward.kind=gsm8k "
                                            r"raised ValueError: GSM8K reference 'eight' is not a number"):
        RewardWorker(RewardConfig(kind="gsm8k"), tiny_model_path).score_batch(batch, None)
    rewards, _, failed, _ = RewardWorker(RewardConfig(kind="gsm8k", on_failure="drop"), tiny_model_path).score_batch(
        batch, None)
    assert list(failed) == [1]
    np.testing.assert_array_equal(rewards[[0, 2]], [1.0, 1.0])


# ---- dropping from the batch ------------------------------------------------------------------------------------


def groups_batch(tokenizer):
    """4 prompts x 2 samples: prompt ids 0, 0, 1, 1, 2, 2, 3, 3."""
    batch, _ = rollout(tokenizer, [f"r{i}" for i in range(8)], prompt_ids=[i // 2 for i in range(8)])
    return batch, np.arange(8, dtype=np.float32)


@pytest.mark.parametrize("whole_groups, multiple, kept", [
    (True, 1, [0, 1, 4, 5, 6, 7]),   # GRPO/RLOO: row 3 fails, its prompt (1) leaves with it
    (True, 4, [0, 1, 4, 5]),         # 6 rows do not split in 4 learner steps: the last group goes too
    (False, 1, [0, 1, 2, 4, 5, 6, 7]),  # PPO: only the failed sample
    (False, 4, [0, 1, 2, 4]),        # ... then the last rows until 4 steps split evenly
])
def test_drop_failed_removes_the_sample_or_its_group_and_keeps_learner_steps_even(tokenizer, whole_groups,
                                                                                   multiple, kept):
    batch, rewards = groups_batch(tokenizer)
    out, out_rewards = drop_failed(batch, rewards, {3: "reward of row 3 failed"}, whole_groups, multiple)
    assert out.column("response_token_ids").to_pylist() == batch.take(kept).column("response_token_ids").to_pylist()
    np.testing.assert_array_equal(out_rewards, rewards[kept])


def test_drop_failed_treats_a_prompt_drawn_twice_as_one_group_and_never_leaves_an_empty_batch(tokenizer):
    batch, rewards = rollout(tokenizer, ["a", "b", "c", "d"], prompt_ids=[5, 5, 6, 5])[0], np.arange(4.0)
    out, _ = drop_failed(batch, rewards, {0: "x"}, whole_groups=True, multiple=1)
    assert out.column("prompt_id").to_pylist() == [6]  # the learner groups by prompt_id: both copies leave
    same = drop_failed(batch, rewards, {}, whole_groups=True, multiple=4)
    assert same[0] is batch and same[1] is rewards
    with pytest.raises(RewardFailure, match="1 of 4 samples failed and no batch of whole prompt groups that "
                                            "splits over 2 learner steps is left"):
        drop_failed(batch, rewards, {2: "reward of row 2 failed"}, whole_groups=True, multiple=2)


# ---- through the driver ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_drop_through_the_driver_removes_failed_groups_and_counts_them(tmp_path):
    """GRPO against a remote server that answers 503 once (retried), then fails one sample of every batch for good
    (500): with reward.on_failure=drop each iteration trains on the other 7 prompt groups (28 of 32 samples) and
    its metrics row counts the failure."""
    if os.environ.get("OIRL_IN_LOOPBACK_NS") != "1":
        pytest.skip("starts Ray: run under deploy/loopback.sh")
    server = FlakyServer([503], poison_first_row=True)
    try:
        out = tmp_path / "drop"
        proc = subprocess.run([sys.executable, "-m", "oirl.cli", "train", "--config", "configs/smoke.yaml",
                               "--out", str(out), "--no-progress", "iterations=2", "reward.kind=none",
                               f"reward.url={server.url}", "reward.on_failure=drop", "learner.algorithm=grpo",
                               "learner.kl_coef=0"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [(r["reward/failed"], r["reward/dropped"], r["rollout/samples"]) for r in rows] == [(1, 4, 28)] * 2
        assert server.calls[0] == server.calls[1]  # the 503'd batch was sent again
        assert "1 rewards failed, 4 of 32 samples left the batch" in proc.stderr
    finally:
        server.close()
