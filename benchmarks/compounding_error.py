"""Compounding error of behaviour cloning against online imitation, measured against a known expert.

The view this project is built on (arXiv 2310.06147) says RLHF beats SFT because it is online inverse RL from
offline demonstrations: a reward is learned from the demonstrations and the policy is improved on-policy against it,
with the known dynamics of a language model (next state = prefix + token), which avoids behaviour cloning's
compounding error. Ross & Bagnell bound BC's expected mistakes by ~eps*T^2 over a horizon T and online imitation by
~eps*T. This script measures three methods on the same demonstrations and fits the growth exponent of each.

Design (each choice is a knob in `Settings`):
- Language: `vocab` tokens; known, deterministic dynamics (no expert in them). Two settings:
  - window: a state is the last `context` tokens; the next state drops the oldest token and appends the new one. A
    wrong token leaves the state after `context` steps, so the learner can drift back onto demonstrated states.
  - prefix: the state also carries a running hash of the whole prefix (`prefix_buckets` values, updated by an
    invertible map per token), as a language model's state is its whole prefix. Two prefixes that differ once never
    share a state again, so a mistake persists: the regime in which Ross & Bagnell's T^2 is tight. It is the primary
    setting (top-level JSON keys) because it is the faithful model of a language model's state.
- Expert: a fixed random teacher (an MLP with seeded weights, `teacher_seed`) whose greedy token is the expert's
  action, so the right action is defined in every state, including those a learner reaches after a mistake.
- Prompts and demonstrations: each seed draws `demos` random prompts and one expert demonstration of length T per
  prompt. Every method gets that same set, and every rollout starts from a prompt of the set.
- Learner: the same small MLP (`Policy`) for every method, started from scratch and fitted with `train_steps` Adam
  steps on minibatches of `batch` rows, label smoothing `label_smoothing`. Smoothing sets the probability BC and
  DAgger put on other tokens in the states they were trained on; the JSON reports each method's rate on the
  expert's own states (`*_step_error_per_seed`) so it is checked rather than assumed.
- bc: cross-entropy on the demonstrations.
- il = online IRL from the demonstrations alone (GAIL-style, `online_irl`): start from the BC policy; each of
  `irl_rounds` rounds, sample `irl_rollouts` rollouts of the current policy with the known dynamics, retrain a
  discriminator (same `Policy` network; its logit for (s, a) is its output a in s) for `disc_steps` steps between
  demonstration pairs and this round's learner pairs, then make `pg_epochs` PPO-clip passes over the round's
  rollouts on the reward clip(logit D(s, a), +-reward_clip) - kl_coef * (log pi - log pi_BC), with discounted
  (`gamma`) returns-to-go and a per-step mean baseline. It never queries the expert: `no_expert_queries` makes any
  expert call inside it raise.
- dagger: DAgger (beta = 0) from the BC policy: `dagger_iters` times, roll out the learner `dagger_rollouts` times,
  label every visited state with the *expert's* action, retrain from scratch on the union. It queries the expert,
  which is more information than the demonstrations; it is the method behind Ross & Bagnell's ~T bound.
  Budget: il and dagger both sample 1536 learner rollouts (12 x 128, 6 x 256). After the shared BC fit, il takes
  12 x (50 discriminator + T/4 policy) steps of 512 rows, dagger 6 x 400 steps of 512 rows.
- Error: expected number of steps, of T, at which the learner's token differs from the expert's in the learner's
  own state, along its own sampled rollouts: sum_t (1 - pi(expert(s_t) | s_t)), over `eval_rollouts` rollouts (the
  same draws for every method of a seed).
- Fit: log(error) = a + b log(T) by least squares over every (seed, T); b's 95% Student-t interval, and one from
  resampling seeds (compounding_report.py).

    python -m benchmarks.compounding_error --out DIR [--quick]

writes DIR/compounding_error.json and DIR/compounding_error.png. Deterministic given the seeds; one thread.
Result and interpretation: benchmarks/README.md ("Compounding error").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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

from benchmarks.compounding_report import fit_exponent, plot, summarize

__all__ = ["fit_exponent", "plot"]  # re-exported: the tests and readers find the fit here

HASH_MULT = 5  # prefix hash: h' = (HASH_MULT * h + token + 1) mod hash_size; a bijection in h when coprime


@dataclass(frozen=True)
class Settings:
    vocab: int = 16
    """tokens in the language"""
    context: int = 3
    """tokens in a state (the expert and the learner see the last `context` tokens)"""
    prefix_hash: int = 4096
    """prefix setting: values of the prefix hash carried in the state (coprime to 5); 0 runs the window only"""
    hash_size: int = 0
    """the setting being run: 0 = window, >0 = prefix with this many hash values (`run` sets it per setting)"""
    teacher_hash_weight: float = 1.0
    """prefix setting: scale of the teacher's hash embedding relative to a token's"""
    teacher_hidden: int = 16
    """hidden width of the fixed random teacher"""
    teacher_seed: int = 1234
    """seed of the teacher's weights (the same expert for every run of a setting)"""
    embed: int = 16
    """learner: embedding width per state position"""
    hidden: int = 128
    """learner: hidden width"""
    demos: int = 16
    """prompts in the task (a pool drawn per seed) = expert demonstrations of length T, one per prompt"""
    label_smoothing: float = 0.005
    """sets the per-step error of a cross-entropy fit on its trained states"""
    train_steps: int = 400
    """Adam steps per cross-entropy fit (BC once; DAgger once per iteration, from scratch)"""
    lr: float = 1e-2
    """Adam learning rate of the cross-entropy fits and the discriminator"""
    batch: int = 512
    """rows per Adam step"""
    dagger_iters: int = 6
    """DAgger iterations after the BC start"""
    dagger_rollouts: int = 256
    """learner rollouts labelled by the expert per DAgger iteration"""
    irl_rounds: int = 12
    """online IRL rounds after the BC start (rollouts, discriminator, policy update)"""
    irl_rollouts: int = 128
    """learner rollouts per online IRL round"""
    disc_steps: int = 50
    """discriminator Adam steps per round (warm-started; half demonstration rows, half this round's rows)"""
    pg_epochs: int = 1
    """PPO-clip passes per round over that round's rollouts, in minibatches of `batch` rows"""
    gamma: float = 0.9
    """discount of the learned reward in online IRL (a slip is penalised within a few steps; lower variance)"""
    pg_lr: float = 1e-3
    """policy learning rate in online IRL"""
    kl_coef: float = 0.05
    """per-token KL penalty to the BC policy in the online IRL reward (as RLHF keeps the SFT reference)"""
    reward_clip: float = 5.0
    """the learned reward is the discriminator's logit clipped to +-this"""
    ppo_clip: float = 0.2
    """PPO ratio clip"""
    eval_rollouts: int = 2000
    """evaluation rollouts per method, seed and T"""
    horizons: tuple[int, ...] = (4, 8, 16, 32, 64)
    """horizons T"""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """seeds (demonstrations, learner init, rollouts)"""


QUICK = dict(horizons=(4, 8, 16), seeds=(0, 1), train_steps=150, dagger_iters=2, dagger_rollouts=64,
             irl_rounds=3, irl_rollouts=64, disc_steps=20, eval_rollouts=400)


class Policy(nn.Module):
    """Next-token policy over a state [B, width]: `context` tokens, then (prefix setting, hash_size > 0) the prefix
    hash; each position has its own embedding table; one hidden layer; `vocab` logits."""

    def __init__(self, vocab: int, context: int, embed: int, hidden: int, hash_size: int = 0):
        super().__init__()
        width = context + (hash_size > 0)
        self.embed = nn.Embedding(vocab * context + hash_size, embed)
        self.register_buffer("offsets", torch.arange(width) * vocab, persistent=False)
        self.net = nn.Sequential(nn.Linear(width * embed, hidden), nn.Tanh(), nn.Linear(hidden, vocab))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """states [B, width] int64 -> logits [B, vocab] float32"""
        return self.net(self.embed(states + self.offsets).flatten(1))


_NO_EXPERT: list[str] = []  # methods now running that must not query the expert (innermost last)


@contextlib.contextmanager
def no_expert_queries(method: str):
    """Inside this block every `Expert.act` raises: the guarantee that `method` learns from demonstrations only."""
    _NO_EXPERT.append(method)
    try:
        yield
    finally:
        _NO_EXPERT.pop()


class Expert:
    """The known expert: the greedy token of a fixed random teacher (a `Policy` with seeded weights)."""

    def __init__(self, s: Settings):
        gen = torch.Generator().manual_seed(s.teacher_seed)
        self.hash_size = s.hash_size
        self._teacher = Policy(s.vocab, s.context, s.embed, s.teacher_hidden, s.hash_size)
        with torch.no_grad():  # explicit draws, not torch's default init, so the expert is fixed by the seed
            for name, p in self._teacher.named_parameters():
                fan_in = p.shape[1] if p.dim() == 2 and not name.startswith("embed") else 1
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in) if p.dim() == 2 else 0.0 * p)
            self._teacher.embed.weight[s.vocab * s.context:] *= s.teacher_hash_weight

    @torch.no_grad()
    def act(self, states: torch.Tensor) -> torch.Tensor:
        """states [B, width] -> expert tokens [B] int64"""
        if _NO_EXPERT:
            raise RuntimeError(f"{_NO_EXPERT[-1]} queried the expert; it may learn from the demonstrations only "
                               "(remove the expert call from it)")
        return self._teacher(states).argmax(-1)


def step(states: torch.Tensor, tokens: torch.Tensor, hash_size: int = 0) -> torch.Tensor:
    """The known dynamics: states [B, width], tokens [B] -> next states. Drop the oldest token, append the new one;
    with hash_size > 0 the last column is the prefix hash h, advanced to (5h + token + 1) mod hash_size: a
    bijection of h for each token, so two prefixes that differ once keep different hashes under the same tokens."""
    if hash_size == 0:
        return torch.cat([states[:, 1:], tokens[:, None]], dim=1)
    h = (HASH_MULT * states[:, -1] + tokens + 1) % hash_size
    return torch.cat([states[:, 1:-1], tokens[:, None], h[:, None]], dim=1)


def prompt_pool(s: Settings, gen: torch.Generator) -> torch.Tensor:
    """The task's prompts: `demos` uniform random token windows [demos, context] int64, plus (prefix setting) the
    hash of the prompt's tokens as a last column."""
    tokens = torch.randint(0, s.vocab, (s.demos, s.context), generator=gen)
    if s.hash_size == 0:
        return tokens
    if math.gcd(HASH_MULT, s.hash_size) != 1:
        raise ValueError(f"prefix_hash={s.hash_size} shares a factor with {HASH_MULT}, so the hash would merge "
                         "prefixes that differ; pick a value coprime to 5 (e.g. 4096)")
    h = torch.zeros(s.demos, dtype=torch.int64)
    for i in range(s.context):
        h = (HASH_MULT * h + tokens[:, i] + 1) % s.hash_size
    return torch.cat([tokens, h[:, None]], dim=1)


def sample(pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n prompts drawn uniformly, with replacement, from pool [P, width] -> [n, width]."""
    return pool[torch.randint(0, pool.shape[0], (n,), generator=gen)]


@torch.no_grad()
def expert_rollouts(expert: Expert, start: torch.Tensor, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert demonstrations from start [B, width]: states [B*T, width], actions [B*T]."""
    states, actions, x = [], [], start
    for _ in range(horizon):
        a = expert.act(x)
        states.append(x)
        actions.append(a)
        x = step(x, a, expert.hash_size)
    return torch.stack(states, 1).flatten(0, 1), torch.stack(actions, 1).flatten()


@torch.no_grad()
def rollout(policy: nn.Module, start: torch.Tensor, horizon: int, gen: torch.Generator,
            hash_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the policy from start [B, width] with the known dynamics (no expert involved).
    Returns visited states [B, T, width] and sampled tokens [B, T]."""
    states, tokens, x = [], [], start
    for _ in range(horizon):
        a = torch.multinomial(F.softmax(policy(x).float(), dim=-1), 1, generator=gen)[:, 0]
        states.append(x)
        tokens.append(a)
        x = step(x, a, hash_size)
    return torch.stack(states, 1), torch.stack(tokens, 1)


@torch.no_grad()
def miss_probability(policy: nn.Module, expert: Expert, states: torch.Tensor) -> torch.Tensor:
    """1 - pi(expert(s) | s) for states [..., width] -> [...]."""
    flat = states.flatten(0, -2)
    probs = F.softmax(policy(flat).float(), dim=-1)
    return (1.0 - probs.gather(1, expert.act(flat)[:, None])[:, 0]).reshape(states.shape[:-1])


def expected_mistakes(policy: nn.Module, expert: Expert, start: torch.Tensor, horizon: int,
                      gen: torch.Generator) -> float:
    """The error metric: expected number of steps (of `horizon`) where the learner's token differs from the
    expert's in the learner's own state, averaged over rollouts from start [B, width]."""
    states, _ = rollout(policy, start, horizon, gen, expert.hash_size)
    return float(miss_probability(policy, expert, states).sum(1).mean())


@torch.no_grad()
def step_error(policy: nn.Module, expert: Expert, start: torch.Tensor, horizon: int) -> float:
    """Per-step error on the expert's own states (what BC is fitted to): mean of 1 - pi(expert token | s) over the
    expert's rollouts from start [B, width]."""
    states, actions = expert_rollouts(expert, start, horizon)
    return float(1.0 - F.softmax(policy(states), -1).gather(1, actions[:, None]).mean())


def train(s: Settings, states: torch.Tensor, actions: torch.Tensor, seed: int) -> Policy:
    """A fresh `Policy` fitted to (states [N, width], actions [N]) with cross-entropy: `train_steps` Adam steps on
    minibatches of `batch` rows (the whole set when it is smaller)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = Policy(s.vocab, s.context, s.embed, s.hidden, s.hash_size)
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
           bc: Policy, horizon: int, seed: int) -> Policy:
    """DAgger, beta = 0, from the BC policy on the same demonstrations; the expert labels the learner's states."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    policy = bc
    for _ in range(s.dagger_iters):
        visited, _ = rollout(policy, sample(pool, s.dagger_rollouts, gen), horizon, gen, s.hash_size)
        visited = visited.flatten(0, 1)
        states, actions = torch.cat([states, visited]), torch.cat([actions, expert.act(visited)])
        policy = train(s, states, actions, seed)
    return policy


def _pick(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, tokens[..., None])[..., 0]


def online_irl(s: Settings, pool: torch.Tensor, states: torch.Tensor, actions: torch.Tensor, bc: Policy,
               horizon: int, seed: int) -> Policy:
    """Online IRL from the demonstrations (states [N, width], actions [N]) alone, GAIL-style, from the BC policy.
    Each round: sample the policy, retrain the discriminator (demonstration pairs vs this round's pairs), then PPO
    on the learned reward minus a KL penalty to BC. Any expert query inside raises (`no_expert_queries`)."""
    with no_expert_queries("online_irl"):
        torch.manual_seed(20_000 + seed)
        gen = torch.Generator().manual_seed(20_000 + seed)
        policy, ref = copy.deepcopy(bc).train(), bc
        disc = Policy(s.vocab, s.context, s.embed, s.hidden, s.hash_size)
        opt_pi = torch.optim.Adam(policy.parameters(), lr=s.pg_lr)
        opt_d = torch.optim.Adam(disc.parameters(), lr=s.lr)
        half = s.batch // 2
        for _ in range(s.irl_rounds):
            x, a = rollout(policy, sample(pool, s.irl_rollouts, gen), horizon, gen, s.hash_size)  # [B,T,w], [B,T]
            xs, at = x.flatten(0, 1), a.flatten()
            for _ in range(s.disc_steps):  # logistic loss: demonstrations 1, learner 0
                d = torch.randint(0, states.shape[0], (half,), generator=gen)
                g = torch.randint(0, xs.shape[0], (half,), generator=gen)
                loss = (F.softplus(-_pick(disc(states[d]), actions[d])).mean()
                        + F.softplus(_pick(disc(xs[g]), at[g])).mean())
                opt_d.zero_grad()
                loss.backward()
                opt_d.step()
            with torch.no_grad():
                old_logp = _pick(F.log_softmax(policy(xs), -1), at)
                ref_logp = _pick(F.log_softmax(ref(xs), -1), at)
                reward = _pick(disc(xs), at).clamp(-s.reward_clip, s.reward_clip) - s.kl_coef * (old_logp - ref_logp)
                reward = reward.view(a.shape)
                ret = torch.zeros_like(reward)  # discounted returns-to-go [B, T]
                ret[:, -1] = reward[:, -1]
                for t in range(horizon - 2, -1, -1):
                    ret[:, t] = reward[:, t] + s.gamma * ret[:, t + 1]
                adv = ret - ret.mean(0, keepdim=True)  # baseline: the mean return-to-go at each step
                adv = (adv / (adv.std() + 1e-8)).flatten()
            for _ in range(s.pg_epochs):
                for r in torch.randperm(xs.shape[0], generator=gen).split(s.batch):
                    ratio = torch.exp(_pick(F.log_softmax(policy(xs[r]), -1), at[r]) - old_logp[r])
                    clipped = ratio.clamp(1 - s.ppo_clip, 1 + s.ppo_clip)
                    loss = -torch.min(ratio * adv[r], clipped * adv[r]).mean()
                    opt_pi.zero_grad()
                    loss.backward()
                    opt_pi.step()
        return policy.eval()


METHODS = ("bc", "il", "dagger")


def measure(s: Settings, expert: Expert, seed: int, horizon: int) -> dict:
    """The three methods on the same demonstrations for one (seed, T); all evaluated on the same prompts."""
    gen = torch.Generator().manual_seed(seed * 1000 + horizon)
    pool = prompt_pool(s, gen)
    states, actions = expert_rollouts(expert, pool, horizon)
    start = sample(pool, s.eval_rollouts, gen)
    bc = behaviour_cloning(s, states, actions, seed)
    policies = {"bc": bc, "il": online_irl(s, pool, states, actions, bc, horizon, seed),
                "dagger": dagger(s, expert, pool, states, actions, bc, horizon, seed)}
    out = {}
    for name in METHODS:
        out[f"{name}_error"] = expected_mistakes(policies[name], expert, start, horizon,
                                                 torch.Generator().manual_seed(seed * 7 + horizon))
        out[f"{name}_step_error"] = step_error(policies[name], expert, start, horizon)
    return out


def run_setting(s: Settings) -> dict:
    """Every method, seed and horizon of one setting (s.hash_size): errors and fitted exponents."""
    expert = Expert(s)
    raw: dict[str, list[list[float]]] = {}
    for i, seed in enumerate(s.seeds):
        for horizon in s.horizons:
            for key, value in measure(s, expert, seed, horizon).items():
                raw.setdefault(key, [[] for _ in s.seeds])[i].append(value)
    report: dict = {"horizons": list(s.horizons), "hash_size": s.hash_size,
                    "state": f"last {s.context} tokens" + (f" + prefix hash mod {s.hash_size}" if s.hash_size else "")}
    for name in METHODS:
        report.update(summarize(s.horizons, np.array(raw[f"{name}_error"]), raw[f"{name}_step_error"], name))
    return report


def run(s: Settings) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    names = (("prefix", s.prefix_hash),) if s.prefix_hash else ()
    by_setting = {name: run_setting(replace(s, hash_size=n)) for name, n in names + (("window", 0),)}
    primary = "prefix" if s.prefix_hash else "window"
    report: dict = {"primary_setting": primary, **by_setting[primary], "seeds": list(s.seeds),
                    "by_setting": by_setting}
    report.update({
        "why_primary": "a language model's state is its whole prefix, so a wrong token is never forgotten; the "
                       "prefix setting models that (and is where BC's T^2 bound is tight), the window setting lets "
                       "a learner drift back onto demonstrated states",
        "methods": {"bc": "behaviour cloning on the demonstrations",
                    "il": "online IRL from the same demonstrations only (GAIL-style learned reward, PPO with a KL "
                          "penalty to BC, known dynamics); never queries the expert",
                    "dagger": "DAgger (beta=0) from the BC start; QUERIES THE EXPERT in the learner's states"},
        "budget": {"il": f"BC start + {s.irl_rounds} rounds x ({s.irl_rollouts} rollouts, {s.disc_steps} "
                         f"discriminator steps, {s.pg_epochs} PPO epochs over their T * {s.irl_rollouts} rows) in "
                         f"minibatches of {s.batch} rows",
                   "dagger": f"BC start + {s.dagger_iters} iterations x ({s.dagger_rollouts} expert-labelled "
                             f"rollouts, a {s.train_steps}-step refit) of {s.batch} rows"},
        "error": "expected number of steps (of T) where the learner's token differs from the expert's in the "
                 "learner's own state, along its own sampled rollouts; mean over seeds (and s.e.)",
        "exponent_fit": "log(error) = a + b log(T), least squares over every (seed, T); ci: 95% Student t of b; "
                        "ci_seed_bootstrap: 95% percentile over 2000 resamples of the seeds",
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        "machine": "2-core CPU box, torch.set_num_threads(1)",
        "seconds": round(time.perf_counter() - t0, 1),
    })
    return report


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
    for setting, r in report["by_setting"].items():
        print(setting, ", ".join(f"{m} T^{r[f'{m}_exponent']:.2f} [{r[f'{m}_exponent_ci'][0]:.2f}, "
                                 f"{r[f'{m}_exponent_ci'][1]:.2f}]" for m in METHODS))
    print(f"{report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
