"""benchmarks/compounding_error.py: the metric sees the policy, the fit recovers a known exponent, the CLI writes
every key. Fast (CPU, seconds, no Ray).

- the error is measured against the expert: a learner that is the expert has zero error, a uniform learner has
  exactly T(1 - 1/V), a learner that never picks the expert's token has T;
- the dynamics are the known ones (drop the oldest token, append the new one); in the prefix setting a token that
  differs is never forgotten, in the window setting it is forgotten after `context` steps;
- online IRL learns from the demonstrations only: an expert call inside it raises (and the test sees it raise when
  one is planted), and it changes the BC policy for the better;
- the exponent fit recovers known exponents from synthetic data, and refuses data it cannot take logs of;
- BC on demonstrations with corrupted actions has a higher error than BC on the real ones;
- `--quick` writes a JSON with every key and consistent shapes for both settings, and a PNG; a run is deterministic
  given its seeds.
"""

import contextlib
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oirl.config import REPO_ROOT

if str(REPO_ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) leaves the root off the path
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import compounding_error as ce  # noqa: E402

SMALL = replace(ce.Settings(), train_steps=150)
PREFIX = replace(SMALL, hash_size=4096)


class FixedPolicy(nn.Module):
    """Logits from a function of the states: lets a test place a known policy under the metric."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, states):
        return self.fn(states)


def _start(n=500, seed=0, s=SMALL):
    gen = torch.Generator().manual_seed(seed)
    return ce.sample(ce.prompt_pool(s, gen), n, gen), gen


def test_known_dynamics_drop_the_oldest_token_and_append():
    assert ce.step(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([7, 8])).tolist() == [[2, 3, 7], [5, 6, 8]]
    # prefix setting: the hash column advances to (5h + token + 1) mod hash_size
    assert ce.step(torch.tensor([[1, 2, 3, 10]]), torch.tensor([7]), 16).tolist() == [[2, 3, 7, (50 + 8) % 16]]


@pytest.mark.parametrize("hash_size", [0, 4096])
def test_a_wrong_token_persists_only_in_the_prefix_setting(hash_size):
    """Two prompts that differ in one token, then the same 40 tokens: the window setting forgets the difference after
    `context` steps; the prefix setting never does."""
    s = replace(SMALL, hash_size=hash_size)
    pool = ce.prompt_pool(s, torch.Generator().manual_seed(5))[:1]
    other = pool.clone()
    other[0, s.context - 1] = (other[0, s.context - 1] + 1) % s.vocab  # the newest token
    if hash_size:  # the other prompt's own hash, as prompt_pool computes it
        h = 0
        for tok in other[0, :s.context].tolist():
            h = (5 * h + tok + 1) % hash_size
        other[0, -1] = h
    a, b = pool, other
    same = []
    for tok in torch.randint(0, s.vocab, (40,), generator=torch.Generator().manual_seed(6)):
        a, b = ce.step(a, tok[None], hash_size), ce.step(b, tok[None], hash_size)
        same.append(bool(torch.equal(a, b)))
    assert same == ([False] * 40 if hash_size else [False] * (s.context - 1) + [True] * (40 - s.context + 1)), same


def test_a_hash_that_merges_prefixes_is_refused():
    with pytest.raises(ValueError, match="prefix_hash=4095 shares a factor with 5"):
        ce.prompt_pool(replace(SMALL, hash_size=4095), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("horizon, s", [(4, SMALL), (16, SMALL), (16, PREFIX)])
def test_error_is_measured_against_the_expert(horizon, s):
    expert = ce.Expert(s)
    v = s.vocab
    start, gen = _start(s=s)
    as_expert = FixedPolicy(lambda x: F.one_hot(expert.act(x), v).float() * 1e4)
    uniform = FixedPolicy(lambda x: torch.zeros(x.shape[0], v))
    never = FixedPolicy(lambda x: F.one_hot((expert.act(x) + 1) % v, v).float() * 1e4)
    assert ce.expected_mistakes(as_expert, expert, start, horizon, gen) == 0.0
    assert ce.expected_mistakes(uniform, expert, start, horizon, gen) == pytest.approx(horizon * (1 - 1 / v), rel=1e-5)
    assert ce.expected_mistakes(never, expert, start, horizon, gen) == pytest.approx(horizon, rel=1e-6)
    assert ce.step_error(as_expert, expert, start, horizon) == 0.0


@pytest.mark.parametrize("exponent", [1.0, 1.7])
def test_fit_recovers_a_known_exponent(exponent):
    horizons = [4, 8, 16, 32, 64]
    t = np.array(horizons, dtype=float)
    exact = ce.fit_exponent(horizons, 0.3 * t**exponent)
    assert exact["exponent"] == pytest.approx(exponent, abs=1e-9)
    assert exact["intercept"] == pytest.approx(np.log(0.3), abs=1e-9)
    noise = np.exp(np.random.default_rng(1).normal(0, 0.1, size=(5, t.size)))
    fit = ce.fit_exponent(horizons, 0.3 * t**exponent * noise)
    assert fit["exponent"] == pytest.approx(exponent, abs=0.1)
    lo, hi = fit["ci"]
    assert lo < exponent < hi and hi - lo < 0.3, fit
    blo, bhi = fit["ci_seed_bootstrap"]
    assert blo <= fit["exponent"] <= bhi, fit


def test_fit_refuses_what_it_cannot_take_logs_of():
    with pytest.raises(ValueError, match="must be > 0"):
        ce.fit_exponent([4, 8], np.array([[0.1, 0.0]]))
    with pytest.raises(ValueError, match="needs \\[seeds, 3\\]"):
        ce.fit_exponent([4, 8, 16], np.array([[0.1, 0.2]]))


def test_bc_on_corrupted_demonstrations_has_higher_error():
    expert = ce.Expert(SMALL)
    gen = torch.Generator().manual_seed(3)
    pool = ce.prompt_pool(SMALL, gen)
    states, actions = ce.expert_rollouts(expert, pool, 16)
    corrupt = torch.rand(actions.shape, generator=gen) < 0.5
    noisy = torch.where(corrupt, torch.randint(0, SMALL.vocab, actions.shape, generator=gen), actions)
    start = ce.sample(pool, 500, gen)
    errors = {name: ce.expected_mistakes(ce.behaviour_cloning(SMALL, states, a, seed=0), expert, start, 16,
                                         torch.Generator().manual_seed(4))
              for name, a in (("real", actions), ("corrupted", noisy))}
    assert errors["corrupted"] > 2 * errors["real"] + 0.5, errors


def _demos(s, horizon, seed=3):
    expert = ce.Expert(s)
    gen = torch.Generator().manual_seed(seed)
    pool = ce.prompt_pool(s, gen)
    states, actions = ce.expert_rollouts(expert, pool, horizon)
    return expert, pool, states, actions


IRL = replace(PREFIX, irl_rounds=4, irl_rollouts=64, disc_steps=30)


def test_online_irl_never_queries_the_expert(monkeypatch):
    expert, pool, states, actions = _demos(IRL, 8)
    bc = ce.behaviour_cloning(IRL, states, actions, seed=0)
    ce.online_irl(IRL, pool, states, actions, bc, 8, seed=0)  # runs with a live expert in scope: never asks it
    assert ce.expert_rollouts(expert, pool, 2)[1].numel() == 2 * len(pool)  # the guard is lifted on the way out

    real_rollout = ce.rollout

    def rollout_that_peeks(policy, start, horizon, gen, hash_size):  # a method that cheats: asks the expert
        expert.act(start)
        return real_rollout(policy, start, horizon, gen, hash_size)

    monkeypatch.setattr(ce, "rollout", rollout_that_peeks)
    with pytest.raises(RuntimeError, match="online_irl queried the expert"):
        ce.online_irl(IRL, pool, states, actions, bc, 8, seed=0)
    # without the guard the same cheating call goes through: the guard is what caught it
    monkeypatch.setattr(ce, "no_expert_queries", lambda method: contextlib.nullcontext())
    ce.online_irl(IRL, pool, states, actions, bc, 8, seed=0)


def test_online_irl_improves_on_bc_where_mistakes_persist():
    s = replace(ce.Settings(), hash_size=4096)  # the benchmark's own budgets
    expert, pool, states, actions = _demos(s, 16)
    bc = ce.behaviour_cloning(s, states, actions, seed=0)
    il = ce.online_irl(s, pool, states, actions, bc, 16, seed=0)
    start = ce.sample(pool, 1000, torch.Generator().manual_seed(8))
    errors = {name: ce.expected_mistakes(p, expert, start, 16, torch.Generator().manual_seed(9))
              for name, p in (("bc", bc), ("il", il))}
    assert errors["il"] < 0.8 * errors["bc"], errors


def test_run_is_deterministic_given_its_seeds():
    tiny = replace(ce.Settings(), horizons=(4, 8), seeds=(0,), train_steps=30, dagger_iters=1, dagger_rollouts=16,
                   irl_rounds=1, irl_rollouts=16, disc_steps=5, eval_rollouts=100)
    a, b = ce.run(tiny), ce.run(tiny)
    for setting in ("prefix", "window"):
        for name in ce.METHODS:
            key = f"{name}_error_per_seed"
            assert a["by_setting"][setting][key] == b["by_setting"][setting][key], (setting, name)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("compounding")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compounding_error", "--quick", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "compounding_error.json").read_text())


def test_quick_writes_every_key_with_consistent_shapes(quick):
    out, r = quick
    n_s = len(r["seeds"])
    assert r["horizons"] == list(ce.QUICK["horizons"]) and n_s >= 2
    assert set(r["by_setting"]) == {"prefix", "window"} and r["primary_setting"] == "prefix"
    assert r["by_setting"]["prefix"]["hash_size"] == ce.Settings().prefix_hash
    assert r["by_setting"]["window"]["hash_size"] == 0
    for setting, report in r["by_setting"].items():
        n_t = len(report["horizons"])
        for name in ce.METHODS:
            assert len(report[f"{name}_error"]) == len(report[f"{name}_error_sem"]) == n_t
            assert (np.shape(report[f"{name}_error_per_seed"]) == np.shape(report[f"{name}_step_error_per_seed"])
                    == (n_s, n_t))
            assert np.allclose(np.mean(report[f"{name}_error_per_seed"], 0), report[f"{name}_error"])
            assert all(e > 0 for e in report[f"{name}_error"])
            lo, hi = report[f"{name}_exponent_ci"]
            assert lo < report[f"{name}_exponent"] < hi, (setting, name)
            assert (len(report[f"{name}_exponent_ci_seed_bootstrap"]) == 2
                    and len(report[f"{name}_local_exponents"]) == n_t - 1)
    primary = r["by_setting"][r["primary_setting"]]
    for key in ("horizons", "bc_error", "il_error", "dagger_error", "bc_exponent", "il_exponent", "dagger_exponent",
                "bc_exponent_ci", "il_exponent_ci", "dagger_exponent_ci"):
        assert r[key] == primary[key], key
    assert r["settings"]["horizons"] == r["horizons"] and r["seconds"] > 0
    assert set(r["methods"]) == set(r["budget"]) | {"bc"} == set(ce.METHODS)
    assert "never queries the expert" in r["methods"]["il"] and "QUERIES THE EXPERT" in r["methods"]["dagger"]
    assert (out / "compounding_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
