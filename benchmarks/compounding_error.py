"""Compounding error of behaviour cloning against online imitation, measured against a known expert.

The view this project is built on (arXiv 2310.06147) says RLHF beats SFT because imitation *online*, with the known
dynamics of a language model (next state = prefix + token), avoids behaviour cloning's compounding error: Ross &
Bagnell bound BC's expected mistakes by ~eps*T^2 over a horizon T and online imitation (DAgger) by ~eps*T. This
script measures both in a controlled setting and fits the growth exponent; it reports what comes out.

Design (each choice is a knob in `Settings`):
- Language: a vocabulary of `vocab` tokens; a state is the last `context` tokens (the prompt is the first state);
  the dynamics are known and deterministic: the next state drops the oldest token and appends the chosen one.
- Expert: a fixed random teacher (an MLP with seeded weights, `teacher_seed`) whose greedy token is the expert's
  action, so the expert is a known deterministic function of the state and the right action is defined in every
  state, including the ones a learner reaches after a mistake. The teacher's graph has attracting cycles, so the
  expert's own states concentrate on a small part of the state space; a wrong token leaves it.
- Prompts and demonstrations: each seed draws a task of `demos` random prompts and gives every prompt one expert
  demonstration of length T, so the first state of every rollout has been seen. Both methods get the same set, and
  every rollout (DAgger's and the evaluation's) starts from a prompt of the task.
- Learner: the same small MLP (`Policy`, same width and parameter count) for every method. Each fit starts from
  scratch and takes `train_steps` Adam steps on minibatches of `batch` rows, with label smoothing `label_smoothing`. Smoothing sets the probability a
  trained learner puts on tokens other than the expert's in states it was trained on, so both methods make
  mistakes at a similar rate on the expert's states whatever T is; the JSON reports that rate (`*_step_error`,
  measured on the expert's own rollouts) so it can be checked rather than assumed.
- BC: cross-entropy (teacher forcing) on the demonstrations.
- Online IL = DAgger (Ross, Gordon & Bagnell 2011) with beta = 0: start from the BC policy; `dagger_iters` times,
  roll out the current learner `dagger_rollouts` times with the known dynamics, label every state it visited with
  the expert's action, add them to the demonstrations and retrain from scratch on the union. DAgger *queries the
  expert* in the learner's states, which is more information than the demonstrations alone; it is Ross & Bagnell's
  online method whose ~T bound the paper cites, not RLHF's learned reward (not measured here).
- Error: the expected number of steps, of T, at which the learner's token differs from the expert's token in the
  learner's own state, along the learner's own sampled rollouts: sum_t (1 - pi(expert(s_t) | s_t)) averaged over
  `eval_rollouts` rollouts from the task's prompts (the same draws for every method of a seed). Using the probability
  rather than the sampled indicator is the same expectation with less variance.
- Fit: log(error) = a + b log(T) by least squares over every (seed, T) point; b's 95% interval from the Student t
  of the slope, and a second one from resampling seeds (bootstrap, refitting the seed-mean curve).

    python -m benchmarks.compounding_error --out DIR [--quick]

writes DIR/compounding_error.json and DIR/compounding_error.png. Deterministic given the seeds; one thread.
Result and interpretation: benchmarks/README.md ("Compounding error").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Settings:
    vocab: int = 16
    """tokens in the language"""
    context: int = 3
    """tokens in a state (the expert and the learner see the last `context` tokens)"""
    teacher_hidden: int = 16
    """hidden width of the fixed random teacher"""
    teacher_seed: int = 1234
    """seed of the teacher's weights (the same expert for every run)"""
    embed: int = 16
    """learner: embedding width per context position"""
    hidden: int = 128
    """learner: hidden width"""
    demos: int = 16
    """prompts in the task (a pool drawn per seed) = expert demonstrations of length T, one per prompt"""
    label_smoothing: float = 0.005
    """sets the per-step error on trained states, the same for every method and T"""
    train_steps: int = 400
    """full-batch Adam steps per training (BC once; DAgger once per iteration, from scratch)"""
    lr: float = 1e-2
    """Adam learning rate"""
    batch: int = 512
    """rows per Adam step"""
    dagger_iters: int = 6
    """DAgger iterations after the BC start"""
    dagger_rollouts: int = 256
    """learner rollouts labelled by the expert per DAgger iteration"""
    eval_rollouts: int = 2000
    """evaluation rollouts per method, seed and T"""
    horizons: tuple[int, ...] = (4, 8, 16, 32, 64)
    """horizons T"""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """seeds (demonstrations, learner init, rollouts)"""


QUICK = dict(horizons=(4, 8, 16), seeds=(0, 1), train_steps=150, dagger_iters=2, dagger_rollouts=64,
             eval_rollouts=400)


class Policy(nn.Module):
    """Next-token policy over a state: embeds each of the `context` positions, one hidden layer, `vocab` logits."""

    def __init__(self, vocab: int, context: int, embed: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab * context, embed)  # a separate table per position
        self.register_buffer("offsets", torch.arange(context) * vocab, persistent=False)
        self.net = nn.Sequential(nn.Linear(context * embed, hidden), nn.Tanh(), nn.Linear(hidden, vocab))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """states [B, context] int64 -> logits [B, vocab] float32"""
        return self.net(self.embed(states + self.offsets).flatten(1))


class Expert:
    """The known expert: the greedy token of a fixed random teacher (a `Policy` with seeded weights)."""

    def __init__(self, s: Settings):
        gen = torch.Generator().manual_seed(s.teacher_seed)
        self.teacher = Policy(s.vocab, s.context, s.embed, s.teacher_hidden)
        with torch.no_grad():  # explicit draws, not torch's default init, so the expert is fixed by the seed
            for name, p in self.teacher.named_parameters():
                fan_in = p.shape[1] if p.dim() == 2 and not name.startswith("embed") else 1
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in) if p.dim() == 2 else 0.0 * p)

    @torch.no_grad()
    def act(self, states: torch.Tensor) -> torch.Tensor:
        """states [B, context] -> expert tokens [B] int64"""
        return self.teacher(states).argmax(-1)


def step(states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The known dynamics: states [B, context], tokens [B] -> next states [B, context] (drop oldest, append)."""
    return torch.cat([states[:, 1:], tokens[:, None]], dim=1)


def prompt_pool(s: Settings, gen: torch.Generator) -> torch.Tensor:
    """The task's prompts: `demos` uniform random states [demos, context] int64."""
    return torch.randint(0, s.vocab, (s.demos, s.context), generator=gen)


def sample(pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n prompts drawn uniformly, with replacement, from pool [P, context] -> [n, context]."""
    return pool[torch.randint(0, pool.shape[0], (n,), generator=gen)]


@torch.no_grad()
def expert_rollouts(expert: Expert, start: torch.Tensor, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert demonstrations from start [B, context]: states [B*T, context], actions [B*T]."""
    states, actions, x = [], [], start
    for _ in range(horizon):
        a = expert.act(x)
        states.append(x)
        actions.append(a)
        x = step(x, a)
    return torch.stack(states, 1).flatten(0, 1), torch.stack(actions, 1).flatten()


@torch.no_grad()
def learner_rollouts(policy: nn.Module, expert: Expert, start: torch.Tensor, horizon: int,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the learner from start [B, context] with the known dynamics.

    Returns (visited states [B, T, context], per-step probability of NOT taking the expert's token [B, T])."""
    states, miss, x = [], [], start
    for _ in range(horizon):
        probs = F.softmax(policy(x).float(), dim=-1)
        miss.append(1.0 - probs.gather(1, expert.act(x)[:, None])[:, 0])
        states.append(x)
        x = step(x, torch.multinomial(probs, 1, generator=gen)[:, 0])
    return torch.stack(states, 1), torch.stack(miss, 1)


def expected_mistakes(policy: nn.Module, expert: Expert, start: torch.Tensor, horizon: int,
                      gen: torch.Generator) -> float:
    """The error metric: expected number of steps (of `horizon`) where the learner's token differs from the
    expert's in the learner's own state, averaged over rollouts from start [B, context]."""
    return float(learner_rollouts(policy, expert, start, horizon, gen)[1].sum(1).mean())


def train(s: Settings, states: torch.Tensor, actions: torch.Tensor, seed: int) -> Policy:
    """A fresh `Policy` fitted to (states [N, context], actions [N]) with cross-entropy: the fixed budget of
    `train_steps` Adam steps on minibatches of `batch` rows (the whole set when it is smaller)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = Policy(s.vocab, s.context, s.embed, s.hidden)
    opt = torch.optim.Adam(policy.parameters(), lr=s.lr)
    for _ in range(s.train_steps):
        rows = torch.randint(0, states.shape[0], (s.batch,), generator=gen) if states.shape[0] > s.batch else None
        x, y = (states, actions) if rows is None else (states[rows], actions[rows])
        loss = F.cross_entropy(policy(x), y, label_smoothing=s.label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy.eval()


def behaviour_cloning(s: Settings, states: torch.Tensor, actions: torch.Tensor, seed: int) -> Policy:
    return train(s, states, actions, seed)


def dagger(s: Settings, expert: Expert, pool: torch.Tensor, states: torch.Tensor, actions: torch.Tensor,
           horizon: int, seed: int) -> Policy:
    """DAgger, beta = 0, starting from BC on the same demonstrations; the expert labels the learner's states."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    policy = train(s, states, actions, seed)
    for _ in range(s.dagger_iters):
        visited, _ = learner_rollouts(policy, expert, sample(pool, s.dagger_rollouts, gen), horizon, gen)
        visited = visited.flatten(0, 1)
        states, actions = torch.cat([states, visited]), torch.cat([actions, expert.act(visited)])
        policy = train(s, states, actions, seed)
    return policy


def fit_exponent(horizons: list[int] | np.ndarray, errors: np.ndarray) -> dict:
    """Least-squares fit of log(error) = a + b log(T).

    errors [seeds, len(horizons)] (or [len(horizons)]). Returns b, a, b's 95% t-interval over every point, and a
    95% interval from resampling seeds (percentile bootstrap of the seed-mean curve; None for one seed)."""
    t = np.asarray(horizons, dtype=np.float64)
    e = np.atleast_2d(np.asarray(errors, dtype=np.float64))
    if e.shape[1] != t.size or t.size < 2:
        raise ValueError(f"errors has shape {e.shape}; it needs [seeds, {t.size}] with at least 2 horizons")
    if not np.all(e > 0) or not np.all(t > 0):
        raise ValueError("fit_exponent takes logs: every horizon and error must be > 0 "
                         f"(got min error {e.min():.3g}); raise eval_rollouts or drop the zero points")
    x, y = np.tile(np.log(t), e.shape[0]), np.log(e).ravel()
    b, a = np.polyfit(x, y, 1)
    n = x.size
    if n > 2:
        resid = y - (a + b * x)
        se = math.sqrt(resid @ resid / (n - 2) / ((x - x.mean()) @ (x - x.mean())))
        half = _t975(n - 2) * se
        ci = [float(b - half), float(b + half)]
    else:
        ci = [float(b), float(b)]
    boot = None
    if e.shape[0] > 1:
        rng = np.random.default_rng(0)
        idx = rng.integers(0, e.shape[0], size=(2000, e.shape[0]))
        slopes = [np.polyfit(np.log(t), np.log(e[i].mean(0)), 1)[0] for i in idx]
        boot = [float(q) for q in np.percentile(slopes, [2.5, 97.5])]
    return {"exponent": float(b), "intercept": float(a), "ci": ci, "ci_seed_bootstrap": boot}


def _t975(df: int) -> float:
    """97.5% quantile of Student's t (table to 30 degrees of freedom, then the normal's 1.96 plus a 1/df term)."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
             2.045, 2.042]
    return table[df - 1] if df <= len(table) else 1.96 + 2.4 / df


@torch.no_grad()
def step_error(policy: nn.Module, expert: Expert, start: torch.Tensor, horizon: int) -> float:
    """Per-step error on the expert's own states (the training error BC is fitted to): mean of
    1 - pi(expert token | s) over the expert's rollouts from start [B, context]."""
    states, actions = expert_rollouts(expert, start, horizon)
    return float(1.0 - F.softmax(policy(states), -1).gather(1, actions[:, None]).mean())


def measure(s: Settings, expert: Expert, seed: int, horizon: int) -> dict:
    """BC and DAgger on the same demonstrations for one (seed, T); both evaluated on the same prompts."""
    gen = torch.Generator().manual_seed(seed * 1000 + horizon)
    pool = prompt_pool(s, gen)
    states, actions = expert_rollouts(expert, pool, horizon)
    start = sample(pool, s.eval_rollouts, gen)
    out = {}
    for name, policy in (("bc", behaviour_cloning(s, states, actions, seed)),
                         ("il", dagger(s, expert, pool, states, actions, horizon, seed))):
        out[f"{name}_error"] = expected_mistakes(policy, expert, start, horizon,
                                                 torch.Generator().manual_seed(seed * 7 + horizon))
        out[f"{name}_step_error"] = step_error(policy, expert, start, horizon)
    return out


def run(s: Settings) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    expert = Expert(s)
    raw: dict[str, list[list[float]]] = {}
    for seed in s.seeds:
        for horizon in s.horizons:
            for key, value in measure(s, expert, seed, horizon).items():
                raw.setdefault(key, [[] for _ in s.seeds])[s.seeds.index(seed)].append(value)
    report: dict = {"horizons": list(s.horizons), "seeds": list(s.seeds)}
    for name in ("bc", "il"):
        per_seed = np.array(raw[f"{name}_error"])
        fit = fit_exponent(s.horizons, per_seed)
        report.update({
            f"{name}_error": per_seed.mean(0).tolist(),
            f"{name}_error_sem": (per_seed.std(0, ddof=1) / math.sqrt(len(s.seeds))).tolist()
            if len(s.seeds) > 1 else [0.0] * len(s.horizons),
            f"{name}_error_per_seed": per_seed.tolist(),
            f"{name}_step_error_per_seed": raw[f"{name}_step_error"],
            f"{name}_exponent": fit["exponent"], f"{name}_intercept": fit["intercept"],
            f"{name}_exponent_ci": fit["ci"], f"{name}_exponent_ci_seed_bootstrap": fit["ci_seed_bootstrap"],
            f"{name}_local_exponents": (np.diff(np.log(per_seed.mean(0))) / np.diff(np.log(s.horizons))).tolist(),
        })
    report.update({
        "methods": {"bc": "behaviour cloning on the demonstrations",
                    "il": "DAgger (beta=0) from the BC start; queries the expert in the learner's states"},
        "error": "expected number of steps (of T) where the learner's token differs from the expert's in the "
                 "learner's own state, along its own sampled rollouts; mean over seeds (and s.e.)",
        "exponent_fit": "log(error) = a + b log(T), least squares over every (seed, T); ci: 95% Student t of b; "
                        "ci_seed_bootstrap: 95% percentile over 2000 resamples of the seeds",
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        "machine": "2-core CPU box, torch.set_num_threads(1)",
        "seconds": round(time.perf_counter() - t0, 1),
    })
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array(report["horizons"], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, label, color in (("bc", "behaviour cloning", "C3"), ("il", "DAgger (online IL)", "C0")):
        b, lo, hi = report[f"{name}_exponent"], *report[f"{name}_exponent_ci"]
        ax.errorbar(t, report[f"{name}_error"], yerr=report[f"{name}_error_sem"], fmt="o", color=color, capsize=3,
                    label=f"{label}: T^{b:.2f} [{lo:.2f}, {hi:.2f}]")
        ax.plot(t, np.exp(report[f"{name}_intercept"]) * t ** b, "-", color=color, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("horizon T (tokens)")
    ax.set_ylabel("expected steps off the expert's token")
    ax.set_title(f"compounding error, {len(report['seeds'])} seeds (mean ± s.e.), fitted a·T^b")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for compounding_error.json and .png")
    ap.add_argument("--quick", action="store_true", help="3 horizons, 2 seeds, small budgets (seconds)")
    args = ap.parse_args(argv)
    s = replace(Settings(), **QUICK) if args.quick else Settings()
    report = run(s)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compounding_error.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "compounding_error.png")
    print(f"BC exponent {report['bc_exponent']:.2f} {report['bc_exponent_ci']}, "
          f"DAgger exponent {report['il_exponent']:.2f} {report['il_exponent_ci']} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
