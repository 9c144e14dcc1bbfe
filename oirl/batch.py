"""RolloutBatch: the one Arrow schema that flows through the loop. Rows are samples.

| column               | type           | filled by        | meaning                                              |
|----------------------|----------------|------------------|------------------------------------------------------|
| prompt_id            | int64          | rollout          | row of the prompt in the dataset                     |
| sample_index         | int32          | rollout          | 0..n-1 among the n samples of one prompt             |
| prompt_token_ids     | list<int32>    | rollout          | prompt ids exactly as the engine saw them [P_i]      |
| response_token_ids   | list<int32>    | rollout          | generated ids, never re-tokenized [R_i]              |
| response_logprobs    | list<float32>  | rollout          | engine logprob of each generated id [R_i]            |
| finish_reason        | string         | rollout          | 'stop' or 'length'                                   |
| policy_version       | int64          | rollout          | weights version the engine served                    |
| engine_index         | int32          | rollout          | which engine generated the row (checks name it)      |
| reference            | string         | driver           | reference answer of the prompt ('' when none)        |
| loss_mask            | list<int8>     | rollout (agents) | 1: the policy generated the token, 0: the environment |
|                      |                |                  | appended it (masked out of loss, KL, entropy, checks) |
| num_turns            | int32          | rollout (agents) | policy turns in the episode                           |
| tool_calls           | int32          | rollout (agents) | tool calls the policy made                            |
| tool_errors          | int32          | rollout (agents) | calls that failed, and environment errors/timeouts    |
| env_reward           | float32        | rollout (agents) | the environment's rewards of the episode, summed      |
| env_seconds          | float32        | rollout (agents) | time the episode waited for its environment           |
| reward_raw           | float32        | reward actor     | the reward before normalisation and clipping         |
| reward               | float32        | reward actor     | scalar reward of the whole response (trained on)     |

The agent columns exist only in multi-turn batches (rollout.env set; actors/agent/episodes.py). There
``response_token_ids`` is the whole episode after the prompt: each policy turn's ids as generated, and between two
turns the ids of the environment's message as the chat template renders it; turn boundaries are the runs of ones in
``loss_mask``, and ``response_logprobs`` holds 0 at the environment's tokens. The driver adds ``env_reward`` to the
reward actor's score of the episode.

The learner adds reference logprobs, values, advantages and returns internally (as tensors, padded once in
``learner.ppo.pad_batch``); no stage rewrites another stage's columns.

The schema's metadata carries the engines' own generation time (``oirl.generate_s``: the longest shard's seconds
inside vLLM's generate), so a batch generated while the learner trained (one-step-off mode), or stored with a
checkpoint, still knows how long it took to generate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROLLOUT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("sample_index", pa.int32()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("response_token_ids", pa.list_(pa.int32())),
        ("response_logprobs", pa.list_(pa.float32())),
        ("finish_reason", pa.string()),
        ("policy_version", pa.int64()),
        ("engine_index", pa.int32()),
    ]
)


def _list_column(seqs: Sequence[Sequence[float]], dtype: pa.DataType, np_dtype: type) -> pa.ListArray:
    """Build a list column from flat values + offsets (one buffer, zero-copy through the object store)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int32, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat: np.ndarray = np.fromiter((v for s in seqs for v in s), dtype=np_dtype, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=dtype))


def make_rollout_batch(
    prompt_ids: Sequence[int],
    sample_indices: Sequence[int],
    prompt_token_ids: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    response_logprobs: Sequence[Sequence[float]],
    finish_reasons: Sequence[str],
    policy_version: int,
    engine_index: int = 0,
) -> pa.Table:
    n = len(prompt_ids)
    for name, col in (("sample_indices", sample_indices), ("prompt_token_ids", prompt_token_ids),
                      ("response_token_ids", response_token_ids), ("response_logprobs", response_logprobs),
                      ("finish_reasons", finish_reasons)):
        assert len(col) == n, f"{name} has {len(col)} rows, expected {n}"
    for i, (ids, lps) in enumerate(zip(response_token_ids, response_logprobs)):
        assert len(ids) == len(lps), f"row {i}: {len(ids)} response ids but {len(lps)} logprobs"
    return pa.Table.from_arrays(
        [
            pa.array(prompt_ids, type=pa.int64()),
            pa.array(sample_indices, type=pa.int32()),
            _list_column(prompt_token_ids, pa.int32(), np.int32),
            _list_column(response_token_ids, pa.int32(), np.int32),
            _list_column(response_logprobs, pa.float32(), np.float32),
            pa.array(finish_reasons, type=pa.string()),
            pa.array(np.full(n, policy_version, dtype=np.int64)),
            pa.array(np.full(n, engine_index, dtype=np.int32)),
        ],
        schema=ROLLOUT_SCHEMA,
    )


def add_agent_columns(table: pa.Table, loss_mask: Sequence[Sequence[int]], num_turns: Sequence[int],
                      tool_calls: Sequence[int], tool_errors: Sequence[int], env_reward: Sequence[float],
                      env_seconds: Sequence[float]) -> pa.Table:
    """The multi-turn columns (see the table above), each checked against the rows."""
    r_len = pc.list_value_length(table.column("response_token_ids")).to_numpy()
    for i, m in enumerate(loss_mask):
        assert len(m) == r_len[i], f"row {i}: loss_mask has {len(m)} entries for {r_len[i]} response ids"
    for name, values, dtype in (("loss_mask", _list_column(loss_mask, pa.int8(), np.int8), None),
                                ("num_turns", num_turns, pa.int32()), ("tool_calls", tool_calls, pa.int32()),
                                ("tool_errors", tool_errors, pa.int32()), ("env_reward", env_reward, pa.float32()),
                                ("env_seconds", env_seconds, pa.float32())):
        table = table.append_column(name, values if dtype is None else pa.array(values, type=dtype))
    return table


GENERATE_S = b"oirl.generate_s"


def with_generate_seconds(table: pa.Table, seconds: float) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), GENERATE_S: repr(float(seconds)).encode()})


def generate_seconds(table: pa.Table) -> float | None:
    """The engines' generation time stored with ``table`` (None: a batch written before it was recorded)."""
    raw = (table.schema.metadata or {}).get(GENERATE_S)
    return float(raw) if raw is not None else None


def add_column(table: pa.Table, name: str, values: pa.Array | np.ndarray | list) -> pa.Table:
    """Stages add columns; none rewrites another stage's column."""
    if name in table.column_names:
        raise ValueError(f"column '{name}' is already in the batch; stages may not rewrite each other's columns")
    return table.append_column(name, pa.array(values))


def list_column_numpy(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, offsets[n+1]) without a Python loop."""
    col = table.column(name).combine_chunks()
    offsets = col.offsets.to_numpy()
    flat = col.values.to_numpy(zero_copy_only=False)
    # Sliced tables keep the parent's offsets: rebase them so flat[offsets[i]:offsets[i+1]] is row i.
    return flat[offsets[0]: offsets[-1]], offsets - offsets[0]


def validate_versions(table: pa.Table, expected: int, async_steps: int = 0) -> None:
    """Every sample must come from a weights version in [expected - async_steps, expected]: exactly ``expected``
    when strictly on-policy (async_steps = 0), at most async_steps versions behind in one-step-off mode."""
    versions = table.column("policy_version").to_numpy()
    lowest = max(expected - async_steps, 0)
    if len(versions) and (versions.min() < lowest or versions.max() > expected):
        want = f"{expected}" if lowest == expected else f"[{lowest}, {expected}] (rollout.async_steps={async_steps})"
        raise RuntimeError(
            f"off-policy samples: policy_version in [{versions.min()}, {versions.max()}] but iteration expects "
            f"{want}; an engine missed a weight sync"
        )
