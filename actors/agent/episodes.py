"""Multi-turn episodes on one vLLM engine, each advancing on its own.

    table, stats = run_episodes(llm, cfg, rows, seeds, version, engine_index)

Every sample of every prompt is an episode. One loop drives vLLM's engine step by step (``LLMEngine.add_request`` /
``step``): when an episode's turn finishes, its environment step runs in a thread pool while the engine goes on
decoding the other episodes, and the episode's next turn is added as soon as its observation is back. There is no
barrier per turn: one slow tool holds up its own episode only.

Token ids are carried exactly: the policy's as the engine generated them (with their logprobs), the environment's
as the chat template renders its message after them (tokenized once, as text the environment wrote). Nothing the
policy generated is decoded and tokenized again. ``loss_mask`` marks each response token: 1 for the policy's, 0 for
the environment's (masked out of the loss, the KL, the entropy and the on-policy check; their logprob column holds
0). Turn boundaries are the runs of ones in ``loss_mask``.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from actors.agent.env import AGENT_PREFIX, Environment, Step, make_env

logger = logging.getLogger(__name__)

_ENV_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="oirl-env")


@dataclass
class Episode:
    prompt_id: int
    sample_index: int
    env: Environment
    messages: list[dict[str, str]]
    prompt: list[int]
    seed: int | None
    resp: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    env_errors: int = 0
    reward: float = 0.0
    finish: str = "stop"
    env_s: float = 0.0

    @property
    def request_id(self) -> str:
        return f"{self.prompt_id}:{self.sample_index}:{self.turns}"


class Renderer:
    """The chat template's text for messages (with the environment's tools), and the ids an observation adds."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.takes_tools: bool | None = None  # whether the template renders `tools` (found once, on first use)

    def render(self, messages: list[dict[str, str]], tools: list[dict] | None, generation: bool) -> str:
        return self.tok.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                            add_generation_prompt=generation)

    def first_messages(self, env: Environment, messages: list[dict[str, str]]) -> tuple[list[dict], list[dict]]:
        """The messages with the tools offered: through the template's tool format, or, for a template that
        ignores ``tools``, a system message listing their schemas."""
        tools = [t.schema() for t in env.tools]
        if tools and self.takes_tools is None:  # a property of the template: not rendered twice per episode
            self.takes_tools = self.render(messages, tools, True) != self.render(messages, None, True)
        if not tools or self.takes_tools:
            return messages, tools
        listing = "Tools (JSON schema):\n" + "\n".join(json.dumps(t["function"]) for t in tools)
        if messages and messages[0]["role"] == "system":
            return [{"role": "system", "content": messages[0]["content"] + "\n" + listing}] + messages[1:], []
        return [{"role": "system", "content": listing}] + messages, []

    def prompt_ids(self, messages: list[dict[str, str]], tools: list[dict]) -> list[int]:
        return [int(t) for t in self.tok.encode(self.render(messages, tools, True), add_special_tokens=False)]

    def between_ids(self, messages: list[dict[str, str]], tools: list[dict], text: str, last_id: int | None,
                    new: list[dict[str, str]]) -> list[int]:
        """The ids the template puts between the policy's turn (``text``, whose last generated id is ``last_id``;
        not yet in ``messages``) and the next turn's first generated token: the end of the policy's message (unless
        the policy generated it: a special token), the ``new`` messages and the generation prompt. Only that
        suffix's text is tokenized; the turn keeps its generated ids."""
        before = self.render(messages, tools, True) + text
        after = self.render(messages + [{"role": "assistant", "content": text}] + new, tools, True)
        if not after.startswith(before):  # a template that rewrites earlier turns: its delta after a stock turn
            mark = "OIRL_TURN_END"
            stock = [{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}]
            base = self.render(stock, None, False)
            whole = self.render(stock + new, None, True)
            if not whole.startswith(base) or mark not in base:
                raise ValueError("the chat template renders a conversation so that a later message changes the text "
                                 "of earlier ones; multi-turn rollouts need a template whose turns append")
            suffix = base.split(mark)[-1] + whole[len(base):]  # the end of the policy's message, then the rest
        else:
            suffix = after[len(before):]
        if last_id is not None and last_id in self.tok.all_special_ids:  # the policy generated its message's end
            piece = self.tok.convert_ids_to_tokens(last_id)
            if suffix.startswith(piece):
                suffix = suffix[len(piece):]
        return [int(t) for t in self.tok.encode(suffix, add_special_tokens=False)]

    def cut(self, text: str, max_tokens: int) -> str:
        ids = self.tok.encode(text, add_special_tokens=False)
        return text if len(ids) <= max_tokens else self.tok.decode(ids[:max_tokens]) + " [cut]"


def episode_budget(cfg: Any) -> int:
    """Response tokens one episode may hold (policy and environment): rollout.max_episode_tokens, or
    max_turns x max_new_tokens + (max_turns - 1) x (max_observation_tokens + TEMPLATE_TOKENS)."""
    return cfg.max_episode_tokens or (cfg.max_turns * cfg.max_new_tokens
                                      + (cfg.max_turns - 1) * (cfg.max_observation_tokens + TEMPLATE_TOKENS))


TEMPLATE_TOKENS = 32
"""Room for what a chat template writes around an observation (the end of the policy's message, the observation's
role header and end, the next generation prompt) in the default episode budget."""


def turn_seed(prompt_seed: int, sample: int, turn: int) -> int:
    """The sampling seed of one turn of one sample: the prompt's seed (the driver's, the same on --resume) mixed
    with both, so no two turns or samples of a batch share one."""
    return int(np.random.default_rng([prompt_seed, sample, turn]).integers(2**31 - 1))


def run_episodes(llm: Any, cfg: Any, rows: list[dict[str, Any]], seeds: list[int | None], version: int,
                 engine_index: int, barrier: bool = False) -> pa.Table:
    """cfg: a RolloutConfig with env set. rows: one dict per prompt ({'prompt_id', 'question', 'answer'}).
    barrier: benchmarks only (benchmarks/agents.py): every episode's next turn waits until the engine has finished
    every turn in flight and every environment step has returned, as a rollout that advances all episodes turn by
    turn would.
    Returns RolloutBatch rows (samples_per_prompt episodes per prompt, grouped by prompt) with the agent columns
    (oirl/batch.py) and the engine's seconds (its steps, not the environments') in the schema metadata."""
    if cfg.env.startswith(AGENT_PREFIX):  # a black-box agent drives its own episodes through an OpenAI endpoint
        from actors.agent.blackbox import run_agent_episodes

        return run_agent_episodes(llm, cfg, rows, seeds, version, engine_index)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from oirl.batch import add_agent_columns, make_rollout_batch, with_generate_seconds

    engine = llm.llm_engine
    tok = llm.get_tokenizer()
    render = Renderer(tok)
    eos = tok.eos_token_id
    budget = episode_budget(cfg)
    env_args = json.loads(cfg.env_args) if cfg.env_args else {}
    episodes: dict[str, Episode] = {}
    order: list[Episode] = []
    tools_of: dict[int, list[dict]] = {}

    def submit(ep: Episode) -> None:
        room = budget - len(ep.resp)
        params = SamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                max_tokens=min(cfg.max_new_tokens, room), logprobs=0, ignore_eos=cfg.ignore_eos,
                                stop=list(getattr(ep.env, "stop", None) or []) or None,
                                include_stop_str_in_output=True,
                                seed=None if ep.seed is None else turn_seed(ep.seed, ep.sample_index, ep.turns))
        episodes[ep.request_id] = ep
        engine.add_request(ep.request_id, TokensPrompt(prompt_token_ids=ep.prompt + ep.resp), params)

    for row, seed in zip(rows, seeds):
        for j in range(cfg.samples_per_prompt):
            env = make_env(cfg.env, env_args)
            messages, tools = render.first_messages(env, env.reset(dict(row)))
            ep = Episode(int(row["prompt_id"]), j, env, messages, render.prompt_ids(messages, tools), seed)
            if cfg.max_model_len and len(ep.prompt) + budget > cfg.max_model_len:
                raise ValueError(f"prompt {ep.prompt_id}: the environment's first messages with its tools are "
                                 f"{len(ep.prompt)} tokens; with the episode's {budget} that exceeds the engine's "
                                 f"{cfg.max_model_len}; raise data.max_prompt_tokens to at least {len(ep.prompt)}")
            tools_of[id(ep)] = tools
            order.append(ep)
            submit(ep)

    pending: dict[concurrent.futures.Future, tuple[Episode, str, bool, float]] = {}
    held: list[Episode] = []  # barrier: next turns waiting for the round to end

    def go(ep: Episode) -> None:
        held.append(ep) if barrier else submit(ep)

    t0 = time.perf_counter()
    engine_s = env_s = 0.0
    while engine.has_unfinished_requests() or pending:
        if engine.has_unfinished_requests():
            t = time.perf_counter()
            outputs = engine.step()
            engine_s += time.perf_counter() - t
            for out in outputs:
                if not out.finished:
                    continue
                ep = episodes.pop(out.request_id)
                c = out.outputs[0]
                ids = [int(x) for x in c.token_ids]
                ep.resp += ids
                ep.mask += [1] * len(ids)
                ep.logprobs += [float(step[x].logprob) for step, x in zip(c.logprobs, ids)]
                ep.turns += 1
                text = tok.decode(ids, skip_special_tokens=True)
                ended_eos = bool(ids) and ids[-1] == eos
                pending[_ENV_POOL.submit(ep.env.step, text)] = (ep, text, ended_eos, time.perf_counter())
        # environment steps that finished go on at once; with the engine idle, wait for the first of them
        wait = 0.0 if engine.has_unfinished_requests() else cfg.env_timeout_s
        done, _ = concurrent.futures.wait(list(pending), timeout=wait,
                                          return_when=concurrent.futures.FIRST_COMPLETED) if pending else ((), ())
        now = time.perf_counter()
        for fut in done:
            ep, text, ended_eos, started = pending.pop(fut)
            ep.env_s += now - started
            env_s += now - started
            _advance(ep, fut, text, ended_eos, cfg, budget, render, tools_of[id(ep)], go)
        for fut, (ep, _text, _e, started) in list(pending.items()):  # stuck steps: the episode ends, the run goes on
            if now - started > cfg.env_timeout_s:
                pending.pop(fut)
                ep.env_s += now - started
                env_s += now - started
                ep.env_errors += 1
                ep.finish = "env_timeout"
                logger.warning("episode %d/%d: environment step timed out after %.0fs (rollout.env_timeout_s); the "
                               "episode ends there", ep.prompt_id, ep.sample_index, cfg.env_timeout_s)
        if held and not pending and not engine.has_unfinished_requests():  # barrier: the round is over
            for ep in held:
                submit(ep)
            held.clear()
    table = make_rollout_batch([e.prompt_id for e in order], [e.sample_index for e in order],
                               [e.prompt for e in order], [e.resp for e in order], [e.logprobs for e in order],
                               [e.finish for e in order], version, engine_index)
    table = add_agent_columns(table, [e.mask for e in order], [e.turns for e in order],
                              [e.tool_calls for e in order], [e.tool_errors + e.env_errors for e in order],
                              [e.reward for e in order], [e.env_s for e in order])
    logger.info("%d episodes in %.1fs: engine %.1fs, environments %.1fs (summed over episodes)", len(order),
                time.perf_counter() - t0, engine_s, env_s)
    return with_generate_seconds(table, engine_s)


def _advance(ep: Episode, fut: concurrent.futures.Future, text: str, ended_eos: bool, cfg: Any, budget: int,
             render: Renderer, tools: list[dict], submit: Any) -> None:
    """After the environment's step on ``ep``'s last turn: end the episode, or append the observation's ids and
    submit the next turn."""
    try:
        step: Step = fut.result()
    except Exception as e:  # the environment's own bug: this episode ends, counted and logged, the run goes on
        ep.env_errors += 1
        ep.finish = "env_error"
        logger.warning("episode %d/%d: environment step raised %s: %s", ep.prompt_id, ep.sample_index,
                       type(e).__name__, e)
        return
    ep.reward += float(step.reward)
    ep.tool_calls += int(step.info.get("tool_calls", 0))
    ep.tool_errors += int(step.info.get("tool_errors", 0))
    if step.done or step.observation is None:
        ep.finish = "stop" if ended_eos or step.done else "length"
        return
    if ep.turns >= cfg.max_turns:
        ep.finish = "max_turns"
        return
    observation = {"role": step.role, "content": render.cut(step.observation, cfg.max_observation_tokens)}
    if step.role:  # a message of its own, as the template writes it
        ids = render.between_ids(ep.messages, tools, text, ep.resp[-1] if ep.resp else None, [observation])
        ep.messages = ep.messages + [{"role": "assistant", "content": text}, observation]
    else:  # inline: the text itself, and the policy goes on with the same message
        ids = [int(t) for t in render.tok.encode(observation["content"], add_special_tokens=False)]
    if len(ep.resp) + len(ids) >= budget:  # no room for the observation and a token of the next turn
        ep.finish = "length"
        return
    ep.resp += ids
    ep.mask += [0] * len(ids)
    ep.logprobs += [0.0] * len(ids)
    submit(ep)


def agent_metrics(table: pa.Table) -> dict[str, float]:
    """rollout/turns_mean, tool_calls_mean, tool_errors, env_seconds, policy_tokens_mean, env_tokens_mean."""
    mask = table.column("loss_mask").combine_chunks()
    flat = mask.values.to_numpy(zero_copy_only=False)
    lengths = np.diff(mask.offsets.to_numpy())
    rows = np.repeat(np.arange(len(lengths)), lengths)
    policy = np.bincount(rows, weights=flat, minlength=len(lengths))
    return {"rollout/turns_mean": float(np.mean(table.column("num_turns").to_numpy())),
            "rollout/tool_calls_mean": float(np.mean(table.column("tool_calls").to_numpy())),
            "rollout/tool_errors": float(np.sum(table.column("tool_errors").to_numpy())),
            "rollout/env_seconds": float(np.mean(table.column("env_seconds").to_numpy())),
            "rollout/policy_tokens_mean": float(policy.mean()) if len(policy) else 0.0,
            "rollout/env_tokens_mean": float((lengths - policy).mean()) if len(policy) else 0.0,
            "rollout/env_reward_mean": float(np.mean(table.column("env_reward").to_numpy()))}
