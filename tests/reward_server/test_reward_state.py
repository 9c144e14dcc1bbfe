"""The reward actor's state for the trainer: running normalisation owned by the caller (score_batch), so a
restarted actor or a resumed run continues exactly; the remote server's token read where the actor starts, never
kept in the config; a missing reward model fails at once, naming the field."""

import json
import threading

import numpy as np
import pytest

from oirl.batch import add_column, make_rollout_batch
from reward_server.http import ServerConfig, make_server
from reward_server.reward_worker import RewardConfig, RewardWorker

NORM = RewardConfig(kind="gsm8k", format_bonus=0.5, normalize=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def batch(tokenizer, responses, references):
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    n = len(responses)
    b = make_rollout_batch(list(range(n)), [0] * n, [[1, 2]] * n, ids, [[0.0] * len(i) for i in ids], ["stop"] * n, 0)
    return add_column(b, "reference", references)


@pytest.fixture(scope="module")
def batches(tokenizer):
    return [batch(tokenizer, ["#### 7", "it is 7", "nothing"], ["7", "7", "7"]),
            batch(tokenizer, ["#### 3", "#### 4", "4", "x 9"], ["3", "4", "#### 4", "9"]),
            batch(tokenizer, ["#### 1", "1", "two"], ["Some steps.\n#### 1", "1", "2"])]


def test_score_batch_chained_equals_the_stateful_path_and_keeps_nothing(tiny_model_path, batches):
    stateful = RewardWorker(NORM, tiny_model_path)
    expected = [stateful.score(b) for b in batches]

    stateless = RewardWorker(NORM, tiny_model_path)
    r0, s0, f0, _ = stateless.score_batch(batches[0], None)
    r1, s1, f1, _ = stateless.score_batch(batches[1], s0)
    np.testing.assert_array_equal(r0, expected[0])
    np.testing.assert_array_equal(r1, expected[1])
    assert stateless.moments.count == 0  # the actor kept nothing: the caller owns the moments
    assert s0["count"] == 3 and s1["count"] == 7 and f0 == f1 == {}

    # A fresh actor (a restart, or a resumed run) given the state as a checkpoint stores it continues identically.
    restored = json.loads(json.dumps(s1))
    r2, s2, _, _ = RewardWorker(NORM, tiny_model_path).score_batch(batches[2], restored)
    np.testing.assert_array_equal(r2, expected[2])
    assert s2 == stateful.moments.state()
    assert not np.allclose(r2, RewardWorker(NORM, tiny_model_path).score_batch(batches[2], None)[0])  # state matters


def test_score_batch_returns_the_raw_reward_beside_the_normalised_one(tiny_model_path, batches):
    """reward/mean of a normalised run is ~0 by construction; the raw reward (before normalisation and clipping)
    is what curves and summaries show: GSM8K match 1 + format bonus 0.5 on '#### 7', 1 + 0.25 on a bare '7' on the
    last line, 0 on 'nothing'."""
    rewards, _, _, raw = RewardWorker(NORM, tiny_model_path).score_batch(batches[0], None)
    np.testing.assert_allclose(raw, [1.5, 1.25, 0.0])
    assert abs(float(rewards.mean())) < 1e-6 and not np.allclose(rewards, raw)


def test_score_batch_without_normalisation_equals_score(tiny_model_path, batches):
    cfg = RewardConfig(kind="gsm8k", format_bonus=0.5, clip=1.0)
    w = RewardWorker(cfg, tiny_model_path)
    rewards, state, _, _ = w.score_batch(batches[1], None)
    np.testing.assert_array_equal(rewards, w.score(batches[1]))
    assert state == {"count": 0, "mean": 0.0, "m2": 0.0}


@pytest.mark.parametrize("state, fragment", [
    ({"count": 2, "mean": 0.5}, "keys count, mean, m2"),
    ({"count": -1, "mean": 0.0, "m2": 0.0}, "norm_state['count']=-1"),
    ({"count": 2, "mean": float("nan"), "m2": 0.0}, "norm_state['mean']=nan"),
    ({"count": 2, "mean": 0.0, "m2": -1.0}, "norm_state['m2']=-1.0"),
    ([1, 2, 3], "keys count, mean, m2"),
])
def test_malformed_norm_state_is_an_error_naming_the_key(tiny_model_path, batches, state, fragment):
    with pytest.raises(ValueError) as e:
        RewardWorker(NORM, tiny_model_path).score_batch(batches[0], state)
    assert fragment in str(e.value)


def test_gsm8k_reward_accepts_dataset_answer_text_and_names_a_bad_row(tiny_model_path, tokenizer):
    w = RewardWorker(RewardConfig(kind="gsm8k"), tiny_model_path)
    b = batch(tokenizer, ["#### 72", "#### 72"], ["72", "She sold 72.\n#### 72"])
    np.testing.assert_array_equal(w.score(b), [1.0, 1.0])
    with pytest.raises(ValueError, match=r"reward of row 1 \(prompt_id 1, sample 0\) failed: reward.kind=gsm8k raised "
                                         r"ValueError: GSM8K reference 'seventy-two' is not a number"):
        w.score(batch(tokenizer, ["#### 72", "#### 72"], ["72", "seventy-two"]))


def test_missing_reward_model_fails_at_once_naming_the_field(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match=r"reward.model_path='.*nope' is not a model folder .*oirl train-rm"):
        RewardWorker(RewardConfig(kind="none", model_path=str(tmp_path / "nope")), tiny_model_path)


# ---- the remote server's token -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(tiny_model_path):
    server = make_server(RewardWorker(RewardConfig(kind="gsm8k"), tiny_model_path),
                         ServerConfig(host="127.0.0.1", port=0, token="s3cret-t0ken"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_token_comes_from_the_named_environment_variable(tiny_model_path, token_server, monkeypatch):
    monkeypatch.setenv("MY_REWARD_TOKEN", "s3cret-t0ken")
    w = RewardWorker(RewardConfig(kind="none", url=token_server, url_token_env="MY_REWARD_TOKEN"), tiny_model_path)
    np.testing.assert_array_equal(w.score_texts(["q"], ["#### 5"], ["5"]), [1.0])
    assert "s3cret" not in json.dumps(w.stats()) and "s3cret" not in repr(w.cfg)


def test_token_comes_from_a_file(tiny_model_path, token_server, tmp_path, monkeypatch):
    monkeypatch.delenv("OIRL_REWARD_TOKEN", raising=False)
    path = tmp_path / "token"
    path.write_text("s3cret-t0ken\n")
    w = RewardWorker(RewardConfig(kind="none", url=token_server, url_token_file=str(path)), tiny_model_path)
    np.testing.assert_array_equal(w.score_texts(["q"], ["#### 5"], ["5"]), [1.0])


def test_a_missing_or_wrong_token_is_an_error_that_says_where_it_comes_from(tiny_model_path, token_server,
                                                                            tmp_path, monkeypatch):
    monkeypatch.setenv("OIRL_REWARD_TOKEN", "wrong-one")
    w = RewardWorker(RewardConfig(kind="none", url=token_server), tiny_model_path)
    with pytest.raises(ValueError) as e:
        w.score_texts(["q"], ["#### 5"], ["5"])
    assert "answered 401" in str(e.value) and "$OIRL_REWARD_TOKEN" in str(e.value)
    assert "wrong-one" not in str(e.value)
    with pytest.raises(ValueError, match=r"reward.url_token_file='.*absent' cannot be read"):
        RewardWorker(RewardConfig(kind="none", url=token_server, url_token_file=str(tmp_path / "absent")),
                     tiny_model_path)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        RewardWorker(RewardConfig(kind="none", url=token_server, url_token_file=str(tmp_path / "empty")),
                     tiny_model_path)


def test_gsm8k_reward_on_data_without_references_fails_at_start():
    from oirl.config import REPO_ROOT, ConfigError, load_config

    with pytest.raises(ConfigError, match="reward.kind=gsm8k scores against each prompt's reference answer, but "
                                          "data.source='synthetic' has none"):
        load_config(REPO_ROOT / "configs" / "smoke.yaml", ["reward.kind=gsm8k"], check_paths=False)
