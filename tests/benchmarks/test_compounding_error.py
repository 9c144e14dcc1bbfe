"""benchmarks/compounding_error.py: the metric sees the policy, the fit recovers a known exponent, the CLI writes
every key. Fast (CPU, seconds, no Ray).

- the error is measured against the expert: a learner that is the expert has zero error, a uniform learner has
  exactly T(1 - 1/V), a learner that never picks the expert's token has T;
- the dynamics are the known ones (drop the oldest token, append the new one);
- the exponent fit recovers known exponents from synthetic data, and refuses data it cannot take logs of;
- BC on demonstrations with corrupted actions has a higher error than BC on the real ones;
- `--quick` writes a JSON with every key and consistent shapes, and a PNG; a run is deterministic given its seeds.
"""

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


class FixedPolicy(nn.Module):
    """Logits from a function of the states: lets a test place a known policy under the metric."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, states):
        return self.fn(states)


def _start(n=500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ce.sample(ce.prompt_pool(SMALL, gen), n, gen), gen


def test_known_dynamics_drop_the_oldest_token_and_append():
    assert ce.step(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([7, 8])).tolist() == [[2, 3, 7], [5, 6, 8]]


@pytest.mark.parametrize("horizon", [4, 16])
def test_error_is_measured_against_the_expert(horizon):
    expert = ce.Expert(SMALL)
    v = SMALL.vocab
    start, gen = _start()
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


def test_run_is_deterministic_given_its_seeds():
    tiny = replace(ce.Settings(), horizons=(4, 8), seeds=(0,), train_steps=30, dagger_iters=1, dagger_rollouts=16,
                   eval_rollouts=100)
    a, b = ce.run(tiny), ce.run(tiny)
    assert a["bc_error_per_seed"] == b["bc_error_per_seed"] and a["il_error_per_seed"] == b["il_error_per_seed"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("compounding")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compounding_error", "--quick", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "compounding_error.json").read_text())


def test_quick_writes_every_key_with_consistent_shapes(quick):
    out, r = quick
    n_t, n_s = len(r["horizons"]), len(r["seeds"])
    assert r["horizons"] == list(ce.QUICK["horizons"]) and n_s >= 2
    for name in ("bc", "il"):
        assert len(r[f"{name}_error"]) == len(r[f"{name}_error_sem"]) == n_t
        assert np.shape(r[f"{name}_error_per_seed"]) == np.shape(r[f"{name}_step_error_per_seed"]) == (n_s, n_t)
        assert np.allclose(np.mean(r[f"{name}_error_per_seed"], 0), r[f"{name}_error"])
        assert all(e > 0 for e in r[f"{name}_error"])
        lo, hi = r[f"{name}_exponent_ci"]
        assert lo < r[f"{name}_exponent"] < hi
        assert len(r[f"{name}_exponent_ci_seed_bootstrap"]) == 2 and len(r[f"{name}_local_exponents"]) == n_t - 1
    assert r["settings"]["horizons"] == r["horizons"] and r["seconds"] > 0
    assert set(r["methods"]) == {"bc", "il"}
    assert (out / "compounding_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
