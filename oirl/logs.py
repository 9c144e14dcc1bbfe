"""Where a run's output goes: one file per role under ``--out/logs``, the terminal for what a user must see.

    logs/driver.log                 the CLI process: every log record (oirl's, Ray's, transformers', ...)
    logs/rollout-<i>.log            engine i's actor: its stdout and stderr, vLLM's engine processes included
    logs/learner-<r>.log            learner rank r: DeepSpeed, torch and Python warnings, progress bars
    logs/reward.log                 the reward actor
    (a replaced engine or a restarted actor appends to its role's file)

``oirl train`` (quiet, the default): the terminal shows the progress bar, oirl's own messages (INFO and up from
the packages in OURS, in the driver) and errors from anything; an actor's WARNING+ records from OURS go to its file
and to the stream Ray forwards to the driver, so real warnings still reach the terminal. vLLM's per-sync INFO lines
and its harmless "RotaryEmbedding: Failed to load weights" (rotary embeddings have no weights to reload) stay in
rollout-<i>.log. ``--verbose``: everything on the terminal as before and no actor files (driver.log is written).

    redirect_actor_output(path)              # first line of an actor's __init__; "" leaves the process alone
    configure_driver(log_file, verbose)      # the CLI, once --out is known
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

OURS = ("oirl", "actors", "learner", "reward_server", "benchmarks", "__main__")  # oirl's own loggers
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_dir(out: str | Path) -> Path:
    """The run's logs folder under --out."""
    return Path(out) / "logs"


def role_log(logs: str, role: str) -> str:
    """The file of ``role`` ('driver', 'rollout-0', 'learner-1', 'reward') in the folder ``logs``; "" without one
    (the actor then keeps its output: --verbose)."""
    return os.path.join(logs, f"{role}.log") if logs else ""


def _ours(record: logging.LogRecord) -> bool:
    return record.name.split(".", 1)[0] in OURS


class _TerminalFilter(logging.Filter):
    """oirl's records at the handler's level, anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _ours(record) or record.levelno >= logging.ERROR


def redirect_actor_output(path: str) -> None:
    """Send this actor process's stdout and stderr (file descriptors 1 and 2, so C++ libraries, Python warnings,
    progress bars and child processes such as vLLM's engine core follow) to ``path``, appending. Python logging
    from any library goes there too at INFO and up; WARNING+ records of oirl's own loggers are also written to the
    process's original stderr, which Ray forwards to the driver's terminal. ``path`` empty: nothing changes
    (--verbose, or a role built in-process by a test)."""
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:  # a node without --out (or read-only there): the output stays with Ray, the run goes on
        logging.getLogger(__name__).warning("cannot write this actor's log to %s (%s); its output stays on Ray's "
                                            "worker logs", path, e)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    forward = os.dup(2)  # before the redirect: Ray's stream to the driver
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    root = logging.getLogger()
    to_file = logging.StreamHandler(sys.stderr)  # fd 2: the file now
    to_file.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(to_file)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    to_driver = logging.StreamHandler(os.fdopen(forward, "w", buffering=1))
    to_driver.setLevel(logging.WARNING)
    to_driver.addFilter(_TerminalFilter())
    to_driver.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in OURS:
        logging.getLogger(name).addHandler(to_driver)  # and on to the root's file handler (propagation)
    logging.getLogger(__name__).info("%s: pid %d writes here", Path(path).name, os.getpid())


def configure_driver(log_file: str | None, verbose: bool, level: str = "INFO") -> None:
    """The CLI's logging: every record to ``log_file`` (when given); on the terminal (stderr) oirl's records at
    ``level`` and up and anyone's errors, or with ``verbose`` every record as before. Ray's driver-side logger
    (its own handler, not propagated) is routed the same way."""
    def handlers() -> list[logging.Handler]:
        terminal = logging.StreamHandler(sys.stderr)
        if not verbose:
            terminal.addFilter(_TerminalFilter())
        if not log_file:
            return [terminal]
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        return [terminal, logging.FileHandler(log_file)]

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level)
    for h in handlers():
        h.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(h)
    if not verbose and "ray" in sys.modules:
        # Handlers of its own: ray.init sets its format on the ray logger's handlers
        ray_logger = logging.getLogger("ray")
        for h in list(ray_logger.handlers):
            ray_logger.removeHandler(h)
        for h in handlers():
            ray_logger.addHandler(h)
