"""A RolloutWorker that can break its next load in two ways (tests/actors/test_rollout_worker.py):

- flip one byte of the weights after the actor received them and before its engine's worker loads them: the
  corruption the worker-side fingerprint must catch;
- lose the reload: the actor reports success, with the learner's fingerprint, but the engine's worker never loads
  anything, so only the driver's served() check (the worker's own record) can tell.
"""

from actors.rollout_worker import RolloutWorker


class CorruptingRolloutWorker(RolloutWorker):
    corrupt = False
    lose = False
    expected = ""

    def corrupt_next_load(self) -> None:
        self.corrupt = True

    def lose_next_reload(self) -> None:
        self.lose = True

    def load_weights(self, update, timeout_s=300.0, fault_skip_reload=False):
        self.expected = update.fingerprint  # what a lost reload claims to have loaded
        return super().load_weights(update, timeout_s, fault_skip_reload)

    def _reload(self, wire, arrays, version, fault_skip_reload=False):
        if self.lose:
            self.lose = False
            return [{"fingerprint": self.expected, "verify_s": 0.0, "reload_s": 0.0, "digest_s": 0.0}]
        if self.corrupt:
            self.corrupt = False
            # Byte 0 is the low mantissa byte of the first float32: a change no logprob canary would notice.
            first = arrays[0] if arrays[0].flags.writeable else arrays[0].copy()  # object-store arrays are read-only
            first[0] ^= 1
            arrays = [first, *arrays[1:]]
        return super()._reload(wire, arrays, version, fault_skip_reload)
