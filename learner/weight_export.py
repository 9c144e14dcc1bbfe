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

    def _gathered(self, params: list[Any] | None = None):
        """ZeRO-3: ``params`` (default: every parameter of the policy) whole on every rank inside the block."""
        import contextlib

        import deepspeed

        if self.cfg.zero_stage == 3:
            params = list(self.module.parameters()) if params is None else params
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def _gather_units(self) -> list[list[tuple[str, Any]]]:
        """The policy LM's (HF name, parameter) pairs in named_parameters order, cut into the units ZeRO-3 gathers
        one at a time: the parameters of one element of a ModuleList together (a decoder layer), every other
        parameter alone (embeddings, final norm, an untied head). A rank then holds one unit gathered beyond its
        partition, not the whole model (7B in bf16: 15 GB on every GPU)."""
        import torch

        lm = self.module.lm
        layers = {f"{name}.{i}." for name, m in lm.named_modules() if isinstance(m, torch.nn.ModuleList)
                  for i in range(len(m))}
        units: list[list[tuple[str, Any]]] = []
        last = None
        for name, p in lm.named_parameters():
            key = min((prefix for prefix in layers if name.startswith(prefix)), key=len, default=name)  # outermost
            if key != last or not units:
                units.append([])
            units[-1].append((name, p))
            last = key
        return units

    def export_weights(self, version: int, transport: str, bucket_mb: int, shm_dir: str = "/dev/shm") -> Any:
        """Pack the policy's HF-named weights into buckets (rank 0); under ZeRO-3 every rank joins each unit's
        gather (_gather_units), and rank 0 copies the unit into its place in the buckets before the next."""
        import torch

        from oirl.weights import (
            WeightUpdate,
            bucket_layout,
            fingerprint,
            plan_buckets,
            shm_bucket_path,
            write_tensor,
        )

        t0 = time.perf_counter()
        units = self._gather_units()
        # Shapes and dtypes only (a ZeRO-3 parameter's own tensor is its partition): the buckets' layout
        shapes = [(n, torch.empty(getattr(p, "ds_shape", p.shape), dtype=p.dtype, device="meta"))
                  for unit in units for n, p in unit]
        layout = [bucket_layout(group) for group in plan_buckets(shapes, bucket_mb << 20)]
        buffers: list[np.ndarray] = []
        if self.rank == 0:
            files: list[str] = []
            for i, bucket in enumerate(layout):
                if transport == "shm":
                    path = shm_bucket_path(shm_dir, self.run_id, version, i)
                    files.append(path)
                    self.shm_files[version] = files  # before writing: a failure below still releases it
                    buffers.append(self._shm_buffer(path, bucket.nbytes))
                    bucket.location = path
                else:
                    buffers.append(np.empty(bucket.nbytes, dtype=np.uint8))
        slots = {m.name: (buffers[i] if buffers else None, m) for i, b in enumerate(layout) for m in b.tensors}
        for unit in units:
            with self._gathered([p for _, p in unit]):
                if self.rank == 0:
                    for name, p in unit:
                        buf, meta = slots[name]
                        write_tensor(buf, meta, p.data)
        if self.rank != 0:
            return None
        fp = fingerprint(layout, buffers)
        if transport == "shm":
            for buf in buffers:
                if isinstance(buf, np.memmap):
                    buf.flush()
        elif transport == "collective":
            self.collective_buffers = {version: buffers}  # until broadcast_weights sends them
        else:
            import ray  # only here: shm and collective need no Ray (benchmarks.gpu_check runs without it)

            for bucket, buf in zip(layout, buffers):
                bucket.location = ray.put(buf)
        update = WeightUpdate(version, transport, layout, fp, sum(b.nbytes for b in layout))
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

        copies: dict[int, Any] = {}  # id(parameter) -> its whole tensor in host memory (rank 0)
        for unit in self._gather_units():  # ZeRO-3: one unit gathered at a time, as export_weights does
            with self._gathered([p for _, p in unit]):
                if self.rank == 0:
                    copies.update((id(p), p.detach().cpu().clone()) for _, p in unit)
        head = None
        if self.module.value_head is not None:
            with self._gathered(list(self.module.value_head.parameters())):
                head = {k: v.detach().cpu().clone() for k, v in self.module.value_head.state_dict().items()}
        if self.rank != 0:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # every state_dict entry (a tied head under both names, buffers) from the copies of its parameter
        state = {n: copies[id(v)] if id(v) in copies else v.detach().cpu().clone()
                 for n, v in self.module.lm.state_dict(keep_vars=True).items()}
        self.module.lm.save_pretrained(out, state_dict=state, safe_serialization=True)
        if head is not None:
            torch.save(head, out / "value_head.pt")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "chat_template.jinja", "generation_config.json"):
            src = Path(self.model_path) / name
            if src.is_file():
                shutil.copy(src, out / name)
