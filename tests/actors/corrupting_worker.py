"""A RolloutWorker that can flip one byte of the weights after the actor received them and before its engine's
worker loads them: the corruption the worker-side fingerprint must catch (tests/actors/test_rollout_worker.py)."""

from actors.rollout_worker import RolloutWorker


class CorruptingRolloutWorker(RolloutWorker):
    corrupt = False

    def corrupt_next_load(self) -> None:
        self.corrupt = True

    def _reload(self, wire, arrays, version):
        if self.corrupt:
            self.corrupt = False
            # Byte 0 is the low mantissa byte of the first float32: a change no logprob canary would notice.
            first = arrays[0] if arrays[0].flags.writeable else arrays[0].copy()  # object-store arrays are read-only
            first[0] ^= 1
            arrays = [first, *arrays[1:]]
        return super()._reload(wire, arrays, version)
