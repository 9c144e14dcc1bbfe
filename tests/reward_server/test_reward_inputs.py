"""The reward actor's own input checks, in-process: a malformed or unimportable reward.function, a reward model
with more than one label, and a remote reward server (real HTTP on loopback) that answers with the wrong number
of rewards."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reward_server.reward_worker import RewardConfig, RewardWorker


@pytest.mark.parametrize("function, fragment", [
    ("nocolon", "reward.function='nocolon' must look like 'package.module:function'"),
    ("no_such_module_for_oirl:f", "reward.function='no_such_module_for_oirl:f' cannot be imported"),
    ("slow_reward:missing", "reward.function='slow_reward:missing' cannot be imported"),
])
def test_a_reward_function_that_cannot_be_loaded_is_named(tiny_model_path, function, fragment):
    with pytest.raises(ValueError) as err:
        RewardWorker(RewardConfig(kind="none", function=function), tiny_model_path)
    assert fragment in str(err.value)


def test_a_reward_model_with_two_labels_is_refused(tiny_model_path, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_path, num_labels=2)
    config.pad_token_id = config.eos_token_id
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has 2 labels; a reward model needs exactly 1"):
        RewardWorker(RewardConfig(kind="none", model_path=str(tmp_path)), tiny_model_path)


def serve_replies(reply):
    """A reward server that answers every /score with ``reply`` (a JSON-able object)."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("reply, fragment", [
    ({"rewards": [1.0]}, "returned 1 rewards for 2 rows"),
    ({"rewards": [1.0, 2.0, 3.0]}, "returned 3 rewards for 2 rows"),
    ({"rewards": "1.0 2.0"}, "returned '1.0 2.0' rewards for 2 rows"),
])
def test_a_reward_server_with_the_wrong_number_of_rewards_is_an_error(tiny_model_path, reply, fragment):
    server, url = serve_replies(reply)
    try:
        worker = RewardWorker(RewardConfig(kind="none", url=url, timeout_s=10), tiny_model_path)
        with pytest.raises(ValueError) as err:
            worker.score_texts(["p", "q"], ["a", "b"], ["", ""])
        assert f"reward server {url} {fragment}" in str(err.value)
    finally:
        server.shutdown()
