"""Black-box agents: an agent written against OpenAI's chat-completions API trains unchanged.

    rollout.env: agent:my_package.my_agent:run     # def run(base_url: str, row: dict) -> float | dict
    rollout.env_args: '{"max_steps": 3}'           # more keyword arguments for run (optional)

Each episode runs ``run(base_url, row)`` in its own thread (row: the prompt's data row, {'prompt_id', 'question',
'answer'}, and the episode's 'sample_index'). ``base_url`` points at an OpenAI-compatible endpoint in
this process (actors/agent/openai_server.py) that serves this episode only; the agent calls it with the openai
client (``openai.OpenAI(base_url=base_url, api_key="oirl").chat.completions.create(...)``) as it would call any
server. Each request is rendered through the chat template and decoded by the same engine step loop as the other
episodes (``LLMEngine.add_request``/``step``), with the rollout's sampling (rollout.temperature; the request's own
temperature and top_p are ignored) and at most rollout.max_new_tokens. ``run`` returns the episode's reward (added
to the reward actor's score, as an environment's turn rewards are), or ``{"reward": r, "tool_calls": k}``.

The trajectory is assembled from the requests, never re-tokenised: the first request's rendered messages are the
prompt; each completion's ids are the policy's (loss_mask 1, the engine's logprobs); every later request must
extend the conversation so far (the earlier messages as sent, then the completion as returned, then any new
messages), and the template's ids of what it adds after the completion (the end of the assistant's message, the new
messages, the next generation prompt; computed by ``Renderer.between_ids``) are the environment's
(loss_mask 0). An episode whose request rewrites history (edits or drops a message, changes the completion or the
tools, or overlaps its own requests) fails: the request gets a 400 naming why, the episode ends with what it had
(finish_reason 'env_error', env_reward 0, counted in rollout/tool_errors) and a warning says why. So does an agent
that raises or returns no number, and one that runs past rollout.agent_timeout_s (its thread cannot be killed: it
runs on, and its late requests are refused). Past rollout.max_turns completions or the episode's token budget, a
request is refused and the episode ends there ('max_turns', 'length'); the agent's reward still counts if it
returns one. An episode must make at least one completion: a batch with an episode that ended before its first one
(or whose first messages exceed data.max_prompt_tokens) fails the generate call, naming it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pyarrow as pa

from actors.agent.env import AGENT_PREFIX, Environment
from actors.agent.episodes import Renderer, episode_budget, turn_seed
from actors.agent.openai_server import ChatRequest, RequestError, agent_server

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()


class BlackBoxAgent(Environment):
    """rollout.env=agent:package.module:function. Holds the user's function and its rollout.env_args; it has no
    ``step``: the agent drives its own episode through the endpoint."""

    def __init__(self, fn: Any, spec: str, **kwargs: Any):
        try:
            inspect.signature(fn).bind("http://127.0.0.1/v1", {}, **kwargs)
        except TypeError as e:
            raise TypeError(f"{spec} must be called as run(base_url, row, **rollout.env_args): {e}") from None
        self.fn, self.kwargs = fn, kwargs

    def run(self, base_url: str, row: dict[str, Any]) -> Any:
        return self.fn(base_url, row, **self.kwargs)

    def step(self, text: str) -> Any:
        raise RuntimeError("a black-box agent drives its own episode (actors/agent/blackbox.py); it has no step")


def agent_factory(spec: str) -> Any:
    """'agent:package.module:function' -> a factory of BlackBoxAgent (keywords: rollout.env_args)."""
    from actors.agent.env import import_callable

    target = spec[len(AGENT_PREFIX):]
    if ":" not in target:
        raise ValueError(f"rollout.env={spec!r}: write agent:package.module:function")
    return functools.partial(BlackBoxAgent, import_callable(target, spec), spec)


@dataclass
class _Turn:
    """One chat completion on its way through the engine."""

    ep: _Episode
    request_id: str
    ids: list[int]
    max_tokens: int
    stop: list[str]
    seed: int | None
    added: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    finish: str = ""
    completion_tokens: int = 0
    error: str = ""


@dataclass
class _Episode:
    prompt_id: int
    sample_index: int
    agent: BlackBoxAgent
    row: dict[str, Any]
    seed: int | None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = 0.0
    deadline: float = 0.0
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    last_text: str = ""
    last_id: int | None = None
    prompt: list[int] = field(default_factory=list)
    resp: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    inflight: _Turn | None = None
    engine_s: float = 0.0
    closed: bool = False
    failure: str = ""
    finish: str = "stop"
    reward: float = 0.0
    settled: bool = False
    ended: float = 0.0
    outcome: tuple[bool, Any] | None = None
    """(True, what run returned) or (False, the exception it raised)."""

    @property
    def name(self) -> str:
        return f"{self.prompt_id}/{self.sample_index}"


def extension_error(ep: _Episode, req: ChatRequest) -> str:
    """Why ``req`` does not extend ``ep``'s conversation (its last request, then the completion returned), or ''."""
    k = len(ep.messages)
    if req.tools != ep.tools:
        return "the request's tools differ from the episode's first request (they are part of its prompt)"
    if len(req.messages) < k + 1:
        return (f"the request has {len(req.messages)} messages; it must repeat the conversation so far ({k} "
                f"messages and the completion returned for them) and add to it")
    for i, (sent, now) in enumerate(zip(ep.messages, req.messages)):
        if sent != now:
            return f"messages[{i}] ({now['role']}) differs from what the episode's earlier request sent"
    answer = req.messages[k]
    if answer.get("role") != "assistant" or answer.get("content") != ep.last_text or "tool_calls" in answer:
        return (f"messages[{k}] must be the assistant's completion exactly as returned ({ep.last_text[:60]!r}), not "
                f"{answer.get('role')} {str(answer.get('content'))[:60]!r}")
    return ""


def between_ids(render: Renderer, ep: _Episode, new: list[dict[str, Any]]) -> list[int]:
    """The ids the template writes after the last completion up to the next generation (Renderer.between_ids); a
    template whose turns do not append is the request's error."""
    try:
        return render.between_ids(ep.messages, ep.tools, ep.last_text, ep.last_id, new)
    except ValueError as e:
        raise RequestError(400, f"{e} (black-box agents too)") from None


class _AgentRun:
    """One generate call's black-box episodes: the endpoint's backend (handler threads) and the engine loop."""

    def __init__(self, llm: Any, cfg: Any, model_name: str):
        self.cfg, self.engine = cfg, llm.llm_engine
        self.render = Renderer(llm.get_tokenizer())
        self.budget = episode_budget(cfg)
        self.max_len = int(self.engine.model_config.max_model_len)
        self.model_name = model_name
        self.queue: queue.Queue[_Turn | _Episode | None] = queue.Queue()
        """Requests to decode, episodes whose agent returned, None to wake the loop (a fatal error)."""
        self.by_token: dict[str, _Episode] = {}
        self.fatal = ""
        self.render_lock = threading.Lock()  # one tokenizer, used by every handler thread

    # ---- handler threads --------------------------------------------------------------------------------------------

    def complete(self, token: str, req: ChatRequest) -> dict[str, Any]:
        ep = self.by_token[token]
        for name in req.ignored:
            if name not in _WARNED:
                _WARNED.add(name)
                logger.warning("black-box agents: the request's %s is ignored; the rollout samples with "
                               "rollout.temperature=%g (the learner scores that distribution)", name,
                               self.cfg.temperature)
        with ep.lock, self.render_lock:
            turn = self._admit(ep, req)
        self.queue.put(turn)
        if not turn.done.wait(timeout=max(ep.deadline - time.monotonic(), 0.0) + 60.0):
            raise RequestError(504, f"episode {ep.name}: no completion came back")  # the loop ended abnormally
        if turn.error:
            raise RequestError(410, turn.error)
        n_prompt = len(turn.ids)
        return {"id": f"chatcmpl-{turn.request_id}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model or self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": turn.text},
                             "finish_reason": turn.finish, "logprobs": None}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": turn.completion_tokens,
                          "total_tokens": n_prompt + turn.completion_tokens}}

    def _admit(self, ep: _Episode, req: ChatRequest) -> _Turn:
        """Extend ``ep``'s trajectory with what ``req`` adds and return its turn; RequestError to refuse (holds
        ep.lock)."""
        if ep.closed:
            raise RequestError(410, f"episode {ep.name} has ended ({ep.finish}{': ' + ep.failure if ep.failure else ''})")
        if ep.inflight is not None:
            self._fail(ep, "a request arrived while the previous one was generating; an episode's completions must "
                           "be sequential (one trajectory)")
        if not ep.prompt:
            ids = self.render.prompt_ids(req.messages, req.tools or [])
            if len(ids) + self.budget > self.max_len:
                self.fatal = (f"episode {ep.name}: the agent's first messages are {len(ids)} tokens; with the "
                              f"episode's {self.budget} that exceeds the engine's {self.max_len}; raise "
                              f"data.max_prompt_tokens to at least {len(ids)}")
                self.queue.put(None)
                self._fail(ep, self.fatal)
            ep.prompt = ids
        else:
            why = extension_error(ep, req)
            if why:
                self._fail(ep, why)
            if ep.turns >= self.cfg.max_turns:
                self._close(ep, "max_turns", f"rollout.max_turns={self.cfg.max_turns} completions were made")
            new = req.messages[len(ep.messages) + 1:]
            ids = between_ids(self.render, ep, new)
            if len(ep.resp) + len(ids) >= self.budget:
                self._close(ep, "length", f"the episode's token budget ({self.budget}) is spent")
            ep.resp += ids
            ep.mask += [0] * len(ids)
            ep.logprobs += [0.0] * len(ids)
            ep.tool_calls += sum(m["role"] == "tool" for m in new)
        ep.messages, ep.tools = req.messages, req.tools
        room = self.budget - len(ep.resp)
        turn = _Turn(ep, f"agent-{ep.prompt_id}:{ep.sample_index}:{ep.turns}", ep.prompt + ep.resp,
                     min(self.cfg.max_new_tokens, room, req.max_tokens or self.cfg.max_new_tokens), req.stop,
                     None if ep.seed is None else turn_seed(ep.seed, ep.sample_index, ep.turns))
        ep.inflight = turn
        return turn

    def _fail(self, ep: _Episode, why: str) -> NoReturn:
        ep.closed, ep.failure, ep.finish = True, why, "env_error"
        logger.warning("black-box episode %d/%d failed: %s", ep.prompt_id, ep.sample_index, why)
        raise RequestError(400, f"episode {ep.name} failed: {why}")

    def _close(self, ep: _Episode, finish: str, why: str) -> NoReturn:
        ep.closed, ep.finish = True, finish
        raise RequestError(400, f"episode {ep.name} has ended: {why}")

    # ---- the engine loop ------------------------------------------------------------------------------------------

    def loop(self, episodes: list[_Episode]) -> float:
        """Drive the engine until every episode is settled; returns the seconds spent in engine steps."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        in_engine: dict[str, _Turn] = {}
        engine_s = 0.0
        while not self.fatal and not all(ep.settled for ep in episodes):
            busy = self.engine.has_unfinished_requests()
            wait = 0.0 if busy else max(0.0, min(ep.deadline for ep in episodes if not ep.settled) - time.monotonic())
            items = []
            try:
                items.append(self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait())
                while True:
                    items.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            for item in items:
                if item is None:
                    continue
                if isinstance(item, _Episode):
                    self._settle(item)
                    continue
                params = SamplingParams(n=1, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                        top_k=self.cfg.top_k, max_tokens=item.max_tokens, logprobs=0,
                                        stop=item.stop or None, seed=item.seed)
                item.added = time.monotonic()
                in_engine[item.request_id] = item
                self.engine.add_request(item.request_id, TokensPrompt(prompt_token_ids=item.ids), params)
            if self.engine.has_unfinished_requests():
                t = time.perf_counter()
                outputs = self.engine.step()
                engine_s += time.perf_counter() - t
                for out in outputs:
                    if out.finished and out.request_id in in_engine:
                        self._finished(in_engine.pop(out.request_id), out)
            now = time.monotonic()
            for ep in episodes:
                if not ep.settled and now > ep.deadline:
                    self._timeout(ep, in_engine)
        # Requests still queued or decoding (a fatal error, or an agent that returned with a request in flight):
        # refused, so no handler waits on a loop that has ended.
        left = list(in_engine.values())
        if left:
            self.engine.abort_request([t.request_id for t in left])
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Turn):
                left.append(item)
        for turn in left:
            turn.error = f"episode {turn.ep.name}: the rollout ended{' (' + self.fatal + ')' if self.fatal else ''}"
            turn.done.set()
        return engine_s

    def _finished(self, turn: _Turn, out: Any) -> None:
        c = out.outputs[0]
        ids = [int(x) for x in c.token_ids]
        ep = turn.ep
        with ep.lock:
            ep.inflight = None
            ep.engine_s += time.monotonic() - turn.added
            if ep.closed:
                turn.error = f"episode {ep.name} has ended ({ep.finish})"
            else:
                ep.resp += ids
                ep.mask += [1] * len(ids)
                ep.logprobs += [float(step[x].logprob) for step, x in zip(c.logprobs, ids)]
                ep.turns += 1
                ep.last_text, ep.last_id = c.text, (ids[-1] if ids else None)
                turn.text, turn.finish, turn.completion_tokens = c.text, c.finish_reason or "length", len(ids)
        turn.done.set()

    def _timeout(self, ep: _Episode, in_engine: dict[str, _Turn]) -> None:
        with ep.lock:
            ep.settled, ep.ended = True, time.monotonic()
            if not ep.closed:
                ep.closed, ep.finish = True, "agent_timeout"
                ep.failure = f"the agent ran past rollout.agent_timeout_s={self.cfg.agent_timeout_s:g}s"
                logger.warning("black-box episode %s: %s; it ends there (its thread runs on, its requests are "
                               "refused)", ep.name, ep.failure)
            turn, ep.inflight = ep.inflight, None
        if turn is not None:
            if in_engine.pop(turn.request_id, None) is not None:
                self.engine.abort_request([turn.request_id])
            turn.error = f"episode {ep.name} has ended (agent_timeout)"
            turn.done.set()

    def _settle(self, ep: _Episode) -> None:
        """The agent's thread returned or raised: the episode's reward, or its failure."""
        with ep.lock:
            if ep.settled:  # timed out before
                return
            ep.settled, ep.ended = True, time.monotonic()
            ok, value = ep.outcome if ep.outcome is not None else (False, RuntimeError("no outcome"))
            reward, calls, why = 0.0, None, ""
            if not ok:
                why = f"the agent raised {type(value).__name__}: {value}"
            else:
                info: dict[str, Any] = value if isinstance(value, dict) else {"reward": value}
                try:
                    reward = float(info["reward"])
                    calls = int(info["tool_calls"]) if "tool_calls" in info else None
                except (KeyError, TypeError, ValueError):
                    why = f"the agent returned {value!r:.80}; return a number, or a dict with a number 'reward'"
            if ep.failure:  # the episode failed on a request: what the agent returned is about another conversation
                return
            if why and not ep.closed:  # (a refusal after max_turns or the budget ends the agent as it may)
                ep.closed, ep.finish, ep.failure = True, "env_error", why
                logger.warning("black-box episode %s failed: %s", ep.name, why)
                return
            ep.closed = True
            if not why:
                ep.reward = reward
                ep.tool_calls = ep.tool_calls if calls is None else calls


def run_agent_episodes(llm: Any, cfg: Any, rows: list[dict[str, Any]], seeds: list[int | None], version: int,
                       engine_index: int) -> pa.Table:
    """run_episodes for rollout.env=agent:...: one thread per episode runs the agent against this process's
    endpoint, while this thread drives the engine. Returns RolloutBatch rows with the agent columns."""
    import json

    from actors.agent.env import make_env
    from oirl.batch import add_agent_columns, make_rollout_batch, with_generate_seconds

    env_args = json.loads(cfg.env_args) if cfg.env_args else {}
    model_config = llm.llm_engine.model_config
    run = _AgentRun(llm, cfg, str(getattr(model_config, "served_model_name", "") or model_config.model))
    server = agent_server()
    episodes: list[_Episode] = []
    for row, seed in zip(rows, seeds):
        for j in range(cfg.samples_per_prompt):
            agent = make_env(cfg.env, env_args)
            assert isinstance(agent, BlackBoxAgent), f"rollout.env={cfg.env} built a {type(agent).__name__}"
            episodes.append(_Episode(int(row["prompt_id"]), j, agent, dict(row), seed))

    def drive(ep: _Episode, base_url: str) -> None:
        try:
            ep.outcome = (True, ep.agent.run(base_url, {**ep.row, "sample_index": ep.sample_index}))
        except BaseException as e:  # noqa: BLE001 (the agent's own failure ends its episode, not the run)
            ep.outcome = (False, e)
        run.queue.put(ep)

    t0 = time.perf_counter()
    try:
        for ep in episodes:
            run.by_token[ep.token] = ep
            base_url = server.open(ep.token, run)
            ep.started = time.monotonic()
            ep.deadline = ep.started + cfg.agent_timeout_s
            threading.Thread(target=drive, args=(ep, base_url), daemon=True,
                             name=f"oirl-agent-{ep.prompt_id}-{ep.sample_index}").start()
        engine_s = run.loop(episodes)
    finally:
        for ep in episodes:
            server.close(ep.token)
    if run.fatal:
        raise ValueError(run.fatal)
    empty = [ep for ep in episodes if ep.turns == 0]
    if empty:
        raise RuntimeError(f"{len(empty)} black-box episodes ended before their first chat completion (first: "
                           f"episode {empty[0].name}, {empty[0].failure or empty[0].finish}); every episode needs at "
                           "least one, so the batch cannot be formed")
    table = make_rollout_batch([e.prompt_id for e in episodes], [e.sample_index for e in episodes],
                               [e.prompt for e in episodes], [e.resp for e in episodes],
                               [e.logprobs for e in episodes], [e.finish for e in episodes], version, engine_index)
    table = add_agent_columns(table, [e.mask for e in episodes], [e.turns for e in episodes],
                              [e.tool_calls for e in episodes], [int(bool(e.failure)) for e in episodes],
                              [e.reward for e in episodes],
                              [max(0.0, e.ended - e.started - e.engine_s) for e in episodes])
    logger.info("%d black-box episodes in %.1fs: engine %.1fs, %d failed", len(episodes), time.perf_counter() - t0,
                engine_s, sum(bool(e.failure) for e in episodes))
    return with_generate_seconds(table, engine_s)
