"""The learner's publishing side, mixed into LearnerWorker: what the weight sync and its checks call on the ranks.

Public methods (every rank is called; rank 0 does the work and returns the result):
    export_weights(version, transport, bucket_mb) -> WeightUpdate | None   # buckets + fingerprint (ZeRO-3 gathers)
    join_weight_group(ip, port, world, timeout_s)                          # collective transport: host the group
    broadcast_weights(version, timeout_s)                                  # collective transport: send the buckets
    release_weights(version | None, reuse) / close_shm()                   # /dev/shm hygiene (+ file reuse)
    logprobs(token_ids, prompt_lens) -> list[np.ndarray] | None            # the post-sync canary's learner side
    full_state() -> dict[str, np.ndarray] | None                           # every trainable parameter (tests)
    save_hf(dir)                                                           # the final policy as an HF folder
    claim_shm_dir()                                                        # at setup: lock, dead runs' files
    shm_free_bytes() -> int                                                # room in /dev/shm, before shm is chosen

Only the policy is published: PPO's separate critic (learner/critic.py) never reaches the engines.

Expects from the worker: rank, cfg, module (the policy), engine (DeepSpeed), device, run_id, pad_id, model_path,
shm_dir, shm_lock, shm_files, shm_maps, shm_free, weight_group, collective_buffers.

/dev/shm file reuse: writing a bucket into a new tmpfs file costs a page fault (allocate and zero a page) per 4 KiB,
which made packing 10x a memcpy (0.34 s against 0.025 s for SmolLM2-135M's 538 MB). So a version's files, once every
engine has loaded them, are not deleted but kept with their mapping (``shm_free``, by directory and size) and the next
version's buckets are written into them: renamed to the new version's path, the pages already there and mapped. Only
after a successful load: after a failed one an engine may still be reading, and such files are deleted as before (a
reader keeps an unlinked file's pages, so nothing changes under it).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class WeightPublisher:
    def claim_shm_dir(self) -> None:
        """Every rank cleans its node's /dev/shm of dead runs' buckets (never a live run's); rank 0 holds the
        run's lock there while it lives."""
        from oirl.weights import claim_shm, clean_stale_shm

        if not os.path.isdir(self.shm_dir):
            return
        if self.rank == 0:
            self.shm_lock = claim_shm(self.shm_dir, self.run_id)
        stale = clean_stale_shm(self.shm_dir, self.run_id)
        if stale:
            logger.warning("removed %d /dev/shm files left by runs that are no longer alive", len(stale))

    def shm_free_bytes(self) -> int:
        """Free bytes of this rank's /dev/shm, 0 without one (the driver asks rank 0 before it picks shm)."""
        from oirl.weights import shm_free_bytes

        return shm_free_bytes(self.shm_dir) if os.path.isdir(self.shm_dir) else 0

    def _gathered(self):
        import contextlib

        import deepspeed

        if self.cfg.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def export_weights(self, version: int, transport: str, bucket_mb: int, shm_dir: str = "/dev/shm") -> Any:
        """Pack the policy's HF-named weights into buckets (rank 0); every rank joins the ZeRO-3 gather."""
        from oirl.weights import WeightUpdate, fingerprint, pack_bucket, plan_buckets, shm_bucket_path

        with self._gathered():
            if self.rank != 0:
                return None
            t0 = time.perf_counter()
            named = [(n, p.data) for n, p in self.module.lm.named_parameters()]
            buckets, buffers = [], []
            files = []
            for i, group in enumerate(plan_buckets(named, bucket_mb << 20)):
                if transport == "shm":
                    path = shm_bucket_path(shm_dir, self.run_id, version, i)
                    files.append(path)
                    self.shm_files[version] = files  # before writing: a failure below still releases it
                    bucket, buf = pack_bucket(group, lambda n, p=path: self._shm_buffer(p, n))
                    bucket.location = path
                else:
                    bucket, buf = pack_bucket(group, lambda n: np.empty(n, dtype=np.uint8))
                buckets.append(bucket)
                buffers.append(buf)
            fp = fingerprint(buckets, buffers)
            if transport == "shm":
                for buf in buffers:
                    if isinstance(buf, np.memmap):
                        buf.flush()
            elif transport == "collective":
                self.collective_buffers = {version: buffers}  # until broadcast_weights sends them
            else:
                import ray  # only here: shm and collective need no Ray (benchmarks.gpu_check runs without it)

                for bucket, buf in zip(buckets, buffers):
                    bucket.location = ray.put(buf)
            update = WeightUpdate(version, transport, buckets, fp, sum(b.nbytes for b in buckets))
            update.pack_seconds = time.perf_counter() - t0
            return update

    def _shm_buffer(self, path: str, nbytes: int) -> np.ndarray:
        """A writable mapping of ``path`` of ``nbytes``: a released file of that size in the same directory renamed
        to ``path`` (pages present, mapping kept), else a new file."""
        from oirl.weights import create_shm_file, remove_if_present

        size = max(nbytes, 1)
        mapping = None
        for kept in self.shm_free.values():  # ``path`` itself kept (the same version exported again)
            for j, (old, m) in enumerate(kept):
                if old == path:
                    del kept[j]
                    if m.size == size and os.path.exists(path):
                        mapping = m
                    else:
                        remove_if_present(path)
                    break
        free = self.shm_free.get((os.path.dirname(path), size), [])
        while mapping is None and free:
            old, m = free.pop()
            try:
                os.rename(old, path)
                mapping = m
            except FileNotFoundError:  # removed under us (someone cleaned /dev/shm): try the next, or a new file
                continue
        if mapping is None:
            mapping = create_shm_file(path, size)  # 0600: other users of the node never read the policy
        self.shm_maps[path] = mapping
        return mapping[:nbytes]

    def join_weight_group(self, master_ip: str, master_port: int, world: int, timeout_s: float) -> None:
        """Rank 0 hosts the collective transport's group (its ranks 1.. are the engines' workers); others no-op."""
        if self.rank == 0:
            from oirl.weights import join_weight_group, leave_weight_group

            leave_weight_group(self.weight_group)  # an older group (an engine was replaced) is aborted first
            self.weight_group = None
            self.weight_group = join_weight_group(master_ip, master_port, 0, world, self.device, timeout_s)

    def broadcast_weights(self, version: int, timeout_s: float) -> None:
        """Send the buckets export_weights packed for ``version`` to every engine worker (rank 0; others no-op)."""
        import torch

        from oirl.weights import broadcast_bucket

        if self.rank != 0:
            return
        if self.weight_group is None:
            raise RuntimeError("broadcast_weights before join_weight_group: form the collective group first")
        for buf in self.collective_buffers.pop(version):  # popped: sent or failed, they are not kept
            t = torch.from_numpy(buf)
            broadcast_bucket(self.weight_group[0], t.to(self.device) if self.device.type == "cuda" else t, timeout_s)

    def release_weights(self, version: int | None = None, reuse: bool = False) -> None:
        """A version's /dev/shm files are not needed any more (None: every version's). ``reuse``: every engine has
        loaded it, so keep the files and their mappings for the next version's buckets; else delete them, and with
        ``version=None`` the kept ones too."""
        from oirl.weights import remove_if_present

        for v in list(self.shm_files) if version is None else [version]:
            for path in self.shm_files.pop(v, []):
                mapping = self.shm_maps.pop(path, None)
                if reuse and mapping is not None and os.path.exists(path):
                    self.shm_free.setdefault((os.path.dirname(path), mapping.size), []).append((path, mapping))
                else:
                    remove_if_present(path)
        if version is None and not reuse:
            for kept in self.shm_free.values():
                for path, _ in kept:
                    remove_if_present(path)
            self.shm_free.clear()

    def close_shm(self) -> None:
        """Delete every /dev/shm file of this run, its lock included (end of the run, or after a failure)."""
        from oirl.weights import remove_if_present, shm_lock_path

        self.release_weights(None)
        if self.shm_lock is not None:
            remove_if_present(shm_lock_path(self.shm_dir, self.run_id))
            os.close(self.shm_lock)
            self.shm_lock = None

    def logprobs(self, token_ids: list[list[int]], prompt_lens: list[int]) -> list[np.ndarray] | None:
        """Learner logprobs (temperature 1) of tokens after prompt_lens[i]; the sync canary compares them."""
        import torch

        from learner import ppo
        from oirl.batch import make_rollout_batch

        table = make_rollout_batch(list(range(len(token_ids))), [0] * len(token_ids),
                                   [t[:p] for t, p in zip(token_ids, prompt_lens)],
                                   [t[p:] for t, p in zip(token_ids, prompt_lens)],
                                   [[0.0] * (len(t) - p) for t, p in zip(token_ids, prompt_lens)],
                                   ["length"] * len(token_ids), 0)
        d = {k: v.to(self.device) for k, v in ppo.pad_batch(table, self.pad_id).items()}
        with torch.no_grad():
            logits, _ = self.engine(d["input_ids"], d["attention_mask"], d["resp_index"], 1.0)
            lp = ppo.logprobs_from_logits(logits, d["resp_ids"]).cpu().numpy()
        if self.rank != 0:
            return None
        return [lp[i, : len(t) - p] for i, (t, p) in enumerate(zip(token_ids, prompt_lens))]

    def full_state(self) -> dict[str, np.ndarray] | None:
        """Every trainable parameter as numpy (rank 0); for tests on tiny models."""
        with self._gathered():
            if self.rank != 0:
                return None
            return {n: p.detach().float().cpu().numpy().copy() for n, p in self.module.named_parameters()}

    def save_hf(self, out_dir: str) -> None:
        """The policy as a plain HF folder (weights + config + tokenizer) that transformers and vLLM load; a shared
        value head goes beside it as value_head.pt."""
        import torch

        with self._gathered():
            if self.rank != 0:
                return
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            state = {n: p.detach().cpu().clone() for n, p in self.module.lm.state_dict().items()}
            self.module.lm.save_pretrained(out, state_dict=state, safe_serialization=True)
            if self.module.value_head is not None:
                torch.save(self.module.value_head.state_dict(), out / "value_head.pt")
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "chat_template.jinja", "generation_config.json"):
                src = Path(self.model_path) / name
                if src.is_file():
                    shutil.copy(src, out / name)
