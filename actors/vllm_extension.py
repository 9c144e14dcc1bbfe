"""vLLM worker extension: runs inside the engine's worker, next to the model runner.

Passed to vLLM as ``worker_extension_cls="actors.vllm_extension.WeightReceiver"``; the rollout actor calls its
methods with ``llm.collective_rpc(name, args=...)``. Weights are loaded in place through vLLM's own reload path
(``model_runner.reload_weights``), which takes HF parameter names and redoes the CPU weight packing; plain
``model.load_weights`` fails on CPU, where linear weights live in packed oneDNN handles.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np


class WeightReceiver:
    """Mixed into vLLM's Worker class; ``self.model_runner`` is the worker's model runner."""

    def oirl_join_group(self, master_ip: str, master_port: int, rank: int, world: int, timeout_s: float) -> None:
        """Join the collective transport's group (learner rank 0 is rank 0) from inside this worker's process."""
        import torch

        from oirl.weights import join_weight_group, leave_weight_group

        leave_weight_group(getattr(self, "oirl_group", None))  # an older group (an engine was replaced): aborted
        self.oirl_group = None
        self.oirl_group = join_weight_group(master_ip, master_port, rank, world,
                                            getattr(self, "device", torch.device("cpu")), timeout_s)
        self.oirl_timeout_s = timeout_s

    def _oirl_receive(self, buckets: list[Any]) -> list[Any]:
        """Every bucket of this version, broadcast by learner rank 0 over the collective group, as flat uint8 tensors
        on this worker's GPU (NCCL), or in host memory (gloo on CPU). [nbytes] each."""
        import torch

        from oirl.weights import broadcast_bucket

        if getattr(self, "oirl_group", None) is None:
            raise RuntimeError("sync.transport=collective but this worker never joined the weight group")
        device = getattr(self, "device", torch.device("cpu"))
        out = []
        for b in buckets:
            t = torch.empty(b.nbytes, dtype=torch.uint8, device=device if device.type == "cuda" else "cpu")
            broadcast_bucket(self.oirl_group[0], t, self.oirl_timeout_s)
            out.append(t)
        return out

    def oirl_reload(self, buckets: list[Any], arrays: list[Any] | None, version: int,
                    fault_skip_reload: bool = False) -> dict:
        """Hash, then load every bucket in one reload call (vLLM's layerwise reload expects the full set at once).

        buckets: oirl.weights.bucket_to_wire() of each bucket; arrays: one uint8 buffer (or bytes) per bucket, or
        a /dev/shm path (str) when this worker runs in another process than the rollout actor, or None: receive
        them over the collective transport's group.

        The fingerprint is computed here, in the worker's process, over the very buffers handed to the reload, and
        nothing else: it is never taken from the caller, so a bucket corrupted anywhere on its way (transport,
        actor, RPC, a file rewritten under the mapping) shows up as a mismatch in the driver's served check. The
        collective transport on a GPU is the one exception in form: the reload reads the received device buffers
        in place and XXH3 (a CPU hash) reads a device-to-host copy of them, taken after the broadcast completed,
        so it hashes the same bytes; no GPU implementation of the learner's hash is at hand, and a device-side
        checksum would need a second fingerprint on the learner.

        fault_skip_reload (OIRL_FAULT=stale-engine): everything as usual but the reload itself, then report
        success: the fingerprint cannot see it (the bytes arrived intact); the served digest read back from the
        model before and after the load must (oirl_served, checked in oirl/sync.py).
        """
        from oirl.weights import bucket_from_wire, fingerprint, host_bytes, unpack_bucket

        buckets = [bucket_from_wire(b) for b in buckets]
        # Collective: the reload reads the received tensors where they are (on a GPU: no round trip through the
        # host); the hash, which runs on the CPU, reads a copy of those very bytes (host_bytes).
        received = self._oirl_receive(buckets) if arrays is None else None
        arrays = received if received is not None else arrays
        arrays = [np.frombuffer(a, dtype=np.uint8) if isinstance(a, (bytes, bytearray)) else a for a in arrays]
        t0 = time.perf_counter()
        buffers = [np.memmap(a, dtype=np.uint8, mode="c") if isinstance(a, str)
                   else host_bytes(a) if received is not None else a for a in arrays]
        computed = fingerprint(buckets, buffers)
        t_hash = time.perf_counter()
        sources = received if received is not None else buffers
        named = itertools.chain.from_iterable(unpack_bucket(b, src) for b, src in zip(buckets, sources))
        # What the engine served before this load, read back from the model itself: oirl_served() reports it beside
        # what it serves after, and the driver compares them (oirl/sync.py): new bytes that left the served weights
        # unchanged are a reload that did not happen, whatever the precision (one small update hides in bf16 noise
        # from the logprob checks).
        before = served_digest(self.model_runner.model)
        t_digest = time.perf_counter()
        if not fault_skip_reload:
            self.model_runner.reload_weights(weights_iterator=_with_tied_head(named))
        self.oirl_previous = (getattr(self, "oirl_fingerprint", ""), before)
        self.oirl_version = version
        self.oirl_fingerprint = computed
        return {"version": version, "fingerprint": computed, "verify_s": t_hash - t0,
                "reload_s": time.perf_counter() - t_digest, "digest_s": t_digest - t_hash}

    # ---- benchmark hooks (benchmarks/sync.py): the floor and the per-parameter baseline ---------------------------

    def oirl_reload_floor(self, buckets: list[Any], arrays: list[Any]) -> float:
        """Seconds of the in-place reload alone, of tensors already in this process's memory (copied in untimed):
        the part of a sync no transport can avoid. Loads the same weights again; version and fingerprint stay."""
        from oirl.weights import bucket_from_wire, unpack_bucket

        buckets = [bucket_from_wire(b) for b in buckets]
        resident = [np.array(np.memmap(a, dtype=np.uint8, mode="r") if isinstance(a, str)
                             else np.frombuffer(a, dtype=np.uint8)) for a in arrays]
        t0 = time.perf_counter()
        named = itertools.chain.from_iterable(unpack_bucket(b, buf) for b, buf in zip(buckets, resident))
        self.model_runner.reload_weights(weights_iterator=_with_tied_head(named))
        return time.perf_counter() - t0

    def oirl_stage_tensor(self, name: str, dtype: str, shape: list[int], raw: bytes) -> None:
        """Per-parameter baseline: keep one tensor that arrived in its own RPC (as one-call-per-tensor syncs do)."""
        import torch

        from oirl.weights import _DTYPES

        staged = getattr(self, "oirl_staged", None) or {}
        staged[name] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(_DTYPES[dtype]).view(shape)
        self.oirl_staged = staged

    def oirl_reload_staged(self) -> int:
        """Load every staged tensor in one reload (vLLM's layerwise reload wants the full set); returns the count."""
        staged, self.oirl_staged = getattr(self, "oirl_staged", None) or {}, {}
        self.model_runner.reload_weights(weights_iterator=_with_tied_head(iter(staged.items())))
        return len(staged)

    def oirl_served(self) -> dict:
        """The version and the worker-computed fingerprint of the weights it last loaded (-1 before any sync); the
        digest of the weights the model holds now and, from before that load, the fingerprint and the digest."""
        previous_fingerprint, previous_digest = getattr(self, "oirl_previous", ("", ""))
        return {"version": getattr(self, "oirl_version", -1), "fingerprint": getattr(self, "oirl_fingerprint", ""),
                "served_digest": served_digest(self.model_runner.model),
                "previous_fingerprint": previous_fingerprint, "previous_digest": previous_digest}


def served_digest(model: Any, chunk: int = 1 << 24) -> str:
    """A digest of every parameter and buffer the model holds, computed where they live. In host memory: XXH3 over
    their bytes (memory speed). On a GPU, without a host copy: per tensor the sum of its raw bits and their sum
    weighted by position (mod 65521), in int64, on the device; a changed element changes its tensor's weighted sum
    unless other changes cancel it exactly. Equal weights give equal digests either way, so a reload that loaded
    new bytes cannot keep the digest of the weights before it."""
    import torch
    import xxhash

    h = xxhash.xxh3_128()
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    for name, t in sorted(((n, t) for n, t in tensors if t.numel() > 0), key=lambda nt: nt[0]):
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{flat.dtype}:{flat.numel()};".encode())
        if flat.device.type == "cpu":
            h.update(memoryview(flat.contiguous().view(torch.uint8).numpy()))
            continue
        h.update(device_bit_sums(flat, chunk).encode())
    return h.hexdigest()


def device_bit_sums(flat: Any, chunk: int = 1 << 24) -> str:
    """served_digest's summary of one flat tensor where it lives: the sum of its raw bits and their sum weighted by
    position (mod 65521, + 1), in int64 (wrapping), computed in chunks (temporaries: chunk x 8 bytes)."""
    import torch

    views = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    bits = flat.view(views[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=bits.device)
    weighted = torch.zeros((), dtype=torch.int64, device=bits.device)
    for start in range(0, bits.numel(), chunk):
        part = bits[start:start + chunk].to(torch.int64)
        pos = torch.arange(start, start + part.numel(), dtype=torch.int64, device=bits.device) % 65521 + 1
        total += part.sum()
        weighted += (part * pos).sum()
    return f"{int(total)}:{int(weighted)};"


def _with_tied_head(named):
    """Tied embeddings travel once (as the embedding); vLLM's layerwise reload still wants an lm_head tensor,
    else the head keeps its old packed weights. Re-yield the embedding under the head's name: no extra bytes."""
    seen_head, embed = False, None
    for name, tensor in named:
        seen_head |= name == "lm_head.weight"
        if name == "model.embed_tokens.weight":
            embed = tensor
        yield name, tensor
    if not seen_head and embed is not None:
        yield "lm_head.weight", embed
