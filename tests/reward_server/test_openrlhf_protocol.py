"""OpenRLHF's remote reward protocol, both directions, over real HTTP on loopback.

OpenRLHF (openrlhf/utils/agent.py, and remote_rm_utils.py before it) POSTs JSON {"query": [...], "prompts": [...],
"labels": [...]} to the URL given as --reward.remote_url (conventionally .../get_reward): each query is the policy
tokenizer's decode of prompt + response ids with the special tokens kept, each prompt the chat-templated prompt
text; it reads "rewards" (and "scores", "extra_logs") from the answer.

1. `oirl serve-reward` answers it at /get_reward: a client posting exactly that gets the rewards /score gives for
   the same samples; bad bodies get 400 naming the field; auth, size limits and the read timeout hold as for /score.
2. reward.protocol=openrlhf: oirl's remote backend speaks it, to a small OpenRLHF-style server written here (it
   sees exactly what OpenRLHF would send) and to oirl's own /get_reward.
"""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from oirl.batch import add_column, make_rollout_batch
from oirl.config import ConfigError, load_config
from reward_server.failures import RewardFailure
from reward_server.http import ServerConfig, make_server
from reward_server.reward_worker import RewardConfig, RewardWorker


def prompt_and_response(prompt, response, reference):  # a user reward that depends on where the query is cut
    return 0.01 * len(prompt) + 0.1 * len(response) + (1.0 if response.strip().endswith(reference) else 0.0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def worker(tiny_model_path):
    """The GSM8K rule (with its format bonus) plus a function of the prompt and the response."""
    return RewardWorker(RewardConfig(kind="gsm8k", format_bonus=0.5, function="test_openrlhf_protocol:"
                                     "prompt_and_response"), tiny_model_path)


def serve(worker, **kw):
    server = make_server(worker, ServerConfig(**{"host": "127.0.0.1", "port": 0, **kw}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def server(worker):
    srv, url = serve(worker, max_body_bytes=8192, max_samples_per_request=8)
    yield url
    srv.shutdown()


def post(url, body, token=None, raw=None):
    """POST JSON as OpenRLHF's client does (Content-Type: application/json); (status, decoded answer)."""
    req = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


QUESTIONS = ["What is 3 + 4?", "How many legs have 2 cats?", "Name a prime."]
ANSWERS = ["3 + 4 = 7\n#### 7", "Each has 4, so 8", "#### 9"]
LABELS = ["7", "8", "7"]


def samples(tokenizer):
    """Prompt and response token ids as a rollout has them: the chat-templated question, the answer ending in EOS."""
    prompt_ids = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"] for q in QUESTIONS]
    response_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in ANSWERS]
    return prompt_ids, response_ids


def openrlhf_payload(tokenizer, prompt_ids, response_ids, labels):
    """What OpenRLHF posts for these samples (its SingleTurnAgentExecutor / remote_rm_fn)."""
    return {"query": [tokenizer.decode(p + r, skip_special_tokens=False) for p, r in zip(prompt_ids, response_ids)],
            "prompts": [tokenizer.decode(p, skip_special_tokens=False) for p in prompt_ids],
            "labels": labels}


# ---- 1. oirl serve-reward answers OpenRLHF's request ---------------------------------------------------------


def test_get_reward_gives_the_rewards_of_score_for_the_same_samples(server, tokenizer, worker):
    prompt_ids, response_ids = samples(tokenizer)
    payload = openrlhf_payload(tokenizer, prompt_ids, response_ids, LABELS)
    assert "<|im_start|>" in payload["prompts"][0] and payload["query"][0].endswith("<|im_end|>")  # as OpenRLHF's
    status, out = post(server + "/get_reward", payload)
    assert status == 200, out
    status, ref = post(server + "/score", {"prompt_token_ids": prompt_ids, "response_token_ids": response_ids,
                                           "references": LABELS})
    assert status == 200, ref
    assert out["rewards"] == ref["rewards"] and out["scores"] == ref["rewards"] and out["extra_logs"] == {}
    # The same numbers the reward computes in-process from the decoded texts: the query was cut at the prompt and
    # the special tokens (chat markers, EOS) left out, so the function saw the bare prompt and response.
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in (*prompt_ids, *response_ids)]
    local = worker.score_texts(texts[:3], texts[3:], LABELS, update_stats=False)
    np.testing.assert_allclose(out["rewards"], local, rtol=1e-6)
    assert len(set(out["rewards"])) == 3


def test_get_reward_passes_over_a_bos_before_the_prompt_and_takes_numbers_as_labels(server, worker):
    """A tokenizer that adds BOS gives queries that start with it (OpenRLHF before its agent executor); a label
    read from a JSON dataset may be a number."""
    status, out = post(server + "/get_reward", {"query": ["<|endoftext|>Q: 2+5?A: #### 7<|im_end|>"],
                                                "prompts": ["Q: 2+5?"], "labels": [7]})
    assert status == 200, out
    assert out["rewards"] == pytest.approx(worker.score_texts(["Q: 2+5?"], ["A: #### 7"], ["7"], update_stats=False))


GOOD = {"query": ["q #### 1"], "prompts": ["q"], "labels": ["1"]}


@pytest.mark.parametrize("body, status, fragment", [
    ({"prompts": ["q"], "labels": ["1"]}, 400, "missing field 'query'"),
    ({"query": ["q 1"], "labels": ["1"]}, 400, "missing field 'prompts'"),
    ({"query": ["q 1"], "prompts": ["q"]}, 400, "missing field 'labels': reward.kind=gsm8k"),
    ({**GOOD, "query": "q #### 1"}, 400, "'query' must be a list (one string per sample), got str"),
    ({**GOOD, "prompts": {"0": "q"}}, 400, "'prompts' must be a list (one string per sample), got dict"),
    ({**GOOD, "labels": "1"}, 400, "'labels' must be a list (one reference answer per sample), got str"),
    ({"query": ["q 1", "r 2"], "prompts": ["q"], "labels": ["1", "2"]}, 400,
     "2 query, 1 prompts, 2 labels: give one of each per sample"),
    ({"query": ["q 1"], "prompts": ["q"], "labels": ["1", "2"]}, 400, "1 query, 1 prompts, 2 labels"),
    ({"query": ["q 1", 5], "prompts": ["q", "r"], "labels": ["1", "2"]}, 400, "query[1] must be a string, got int"),
    ({**GOOD, "labels": [["1"]]}, 400, "labels[0] must be a string (or a number), got list"),
    ({**GOOD, "labels": ["seventy"]}, 400, "labels[0]: GSM8K reference 'seventy' is not a number"),
    ({"query": ["q 1", "other 2"], "prompts": ["q", "r"], "labels": ["1", "2"]}, 400,
     "query[1] does not begin with prompts[1] ('r')"),
    ({**GOOD, "label": ["1"]}, 400, "unknown field 'label'; /get_reward (OpenRLHF's protocol) knows: query, "
                                    "prompts, labels"),
    ([GOOD], 400, "body must be a JSON object, got list"),
    ({"query": ["q 1"] * 9, "prompts": ["q"] * 9, "labels": ["1"] * 9}, 413, "9 samples in one request; the limit "
                                                                             "is 8"),
])
def test_bad_get_reward_bodies_get_a_4xx_naming_the_field(server, body, status, fragment):
    got, out = post(server + "/get_reward", body)
    assert got == status and fragment in out["error"], out
    # The server keeps serving. By hand: the rule 1 + 0.5 format bonus; the function 0.01 * len('q') + 0.1 *
    # len(' #### 1') + 1 (it ends with the label).
    reward = pytest.approx(1.5 + 0.01 + 0.7 + 1.0)
    assert post(server + "/get_reward", GOOD) == (200, {"rewards": [reward], "scores": [reward], "extra_logs": {}})


def test_get_reward_keeps_the_servers_limits_and_auth(worker):
    srv, url = serve(worker, token="s3cret", max_body_bytes=512, read_timeout_s=1.0)
    try:
        assert post(url + "/get_reward", GOOD)[0] == 401
        assert post(url + "/get_reward", GOOD, token="wrong")[0] == 401
        assert post(url + "/get_reward", GOOD, token="s3cret")[0] == 200
        status, out = post(url + "/get_reward", None, token="s3cret", raw=b"x" * 600)
        assert status == 413 and "exceeds the limit of 512" in out["error"]
        # A body that stalls is cut at the read timeout with a 408, as on /score.
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as sock:
            t0 = time.monotonic()
            sock.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer s3cret\r\nContent-Length: 100\r\n\r\n{\"query\": [")
            answer = b""
            while chunk := sock.recv(4096):  # the server closes the connection after its answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b"body not received within 1.0s" in answer
            assert time.monotonic() - t0 < 5
    finally:
        srv.shutdown()


# ---- 2. reward.protocol=openrlhf: oirl calls a server that speaks OpenRLHF's protocol ----------------------------


class OpenRLHFStyleServer:
    """A remote reward model as OpenRLHF users write them (its examples: the response is the query after the
    prompt): reward = number of characters of the response + 10 if it contains the label. Records every request;
    the first ``fail_first`` requests get a 503."""

    def __init__(self, fail_first=0, rewards_key="rewards"):
        self.requests: list[dict] = []
        self.fail_first, self.rewards_key = fail_first, rewards_key
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "content_type": self.headers["Content-Type"],
                                       "auth": self.headers.get("Authorization"), "body": body})
                if len(outer.requests) <= outer.fail_first:
                    status, answer = 503, {"error": "warming up"}
                else:
                    rewards = [outer.reward(q, p, label) for q, p, label in
                               zip(body["query"], body["prompts"], body["labels"])]
                    status, answer = 200, {outer.rewards_key: rewards, "scores": rewards,
                                           "extra_logs": {"length": rewards}}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def reward(query, prompt, label):
        response = query[len(prompt):] if query.startswith(prompt) else query
        return float(len(response)) + (10.0 if label and label in response else 0.0)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def rollout(prompt_ids, response_ids, references):
    n = len(prompt_ids)
    batch = make_rollout_batch(list(range(n)), [0] * n, prompt_ids, response_ids,
                               [[0.0] * len(r) for r in response_ids], ["stop"] * n, 0)
    return add_column(batch, "reference", references)


def client(url, tiny_model_path, **kw):
    return RewardWorker(RewardConfig(kind="none", url=url, protocol="openrlhf", **{"timeout_s": 30.0, **kw}),
                        tiny_model_path)


def test_the_openrlhf_client_sends_what_openrlhf_sends(tokenizer, tiny_model_path, monkeypatch):
    monkeypatch.setenv("OIRL_REWARD_TOKEN", "tok")
    remote = OpenRLHFStyleServer()
    try:
        prompt_ids, response_ids = samples(tokenizer)
        rewards = client(remote.url + "/get_reward", tiny_model_path).score(rollout(prompt_ids, response_ids, LABELS))
        expected = openrlhf_payload(tokenizer, prompt_ids, response_ids, LABELS)
        assert remote.requests == [{"path": "/get_reward", "content_type": "application/json",
                                    "auth": "Bearer tok", "body": expected}]
        np.testing.assert_allclose(rewards, [OpenRLHFStyleServer.reward(q, p, label) for q, p, label in
                                             zip(expected["query"], expected["prompts"], LABELS)])
        # By hand: the server saw each answer with its EOS text, and its label in the first two.
        assert rewards.tolist() == [len(a) + len("<|im_end|>") + bonus for a, bonus in zip(ANSWERS, (10, 10, 0))]
        # Texts without token ids (score_texts, e.g. behind another HTTP front): the query is prompt + response.
        rewards = client(remote.url, tiny_model_path).score_texts(["Q?"], [" #### 7"], ["7"])
        assert remote.requests[-1]["path"] == "/get_reward"  # a URL without a path gets OpenRLHF's
        assert remote.requests[-1]["body"] == {"query": ["Q? #### 7"], "prompts": ["Q?"], "labels": ["7"]}
        assert rewards.tolist() == [17.0]
    finally:
        remote.close()


def test_the_openrlhf_client_retries_a_transient_failure_and_refuses_an_answer_without_rewards(tokenizer,
                                                                                             tiny_model_path):
    remote = OpenRLHFStyleServer(fail_first=2)
    try:
        assert client(remote.url, tiny_model_path).score_texts(["p"], ["abc"], [""]).tolist() == [3.0]
        assert len(remote.requests) == 3  # two 503s, then the answer
    finally:
        remote.close()
    remote = OpenRLHFStyleServer(rewards_key="reward")
    try:
        with pytest.raises(RewardFailure, match="answered without a JSON object holding 'rewards'"):
            client(remote.url, tiny_model_path, timeout_s=5.0).score_texts(["p"], ["abc"], [""])
    finally:
        remote.close()


def test_the_openrlhf_client_against_oirls_own_get_reward(server, tokenizer, worker, tiny_model_path):
    """oirl on both sides: the rewards are the server's own for the same samples, from token ids (OpenRLHF's texts
    with their special tokens) and from texts."""
    prompt_ids, response_ids = samples(tokenizer)
    got = client(server, tiny_model_path).score(rollout(prompt_ids, response_ids, LABELS))
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in (*prompt_ids, *response_ids)]
    np.testing.assert_allclose(got, worker.score_texts(texts[:3], texts[3:], LABELS, update_stats=False), rtol=1e-6)
    got = client(server + "/get_reward", tiny_model_path).score_texts(["Q:"], [" so #### 7"], ["7"])
    np.testing.assert_allclose(got, worker.score_texts(["Q:"], [" so #### 7"], ["7"], update_stats=False), rtol=1e-6)


def test_reward_protocol_is_checked():
    with pytest.raises(ConfigError, match="reward.protocol='openrlhf2' must be 'oirl'"):
        load_config("configs/smoke.yaml", ["reward.protocol=openrlhf2"])
    assert load_config("configs/smoke.yaml", ["reward.protocol=openrlhf"]).reward.protocol == "openrlhf"
