"""Where output goes (oirl/logs.py), each in a fresh Python process so that file descriptors and logging are its
own: an actor's stdout and stderr (its children's too) go to its role's file and only oirl's warnings reach the
stream Ray forwards to the terminal; the driver's terminal shows oirl's records and anyone's errors, the file all."""

import subprocess
import sys

from oirl.config import REPO_ROOT

ACTOR = """
import logging, os, subprocess, sys, warnings
from oirl.logs import redirect_actor_output
redirect_actor_output(sys.argv[1])
print("plain stdout line")
print("plain stderr line", file=sys.stderr)
logging.getLogger("vllm.engine").info("library info line")
logging.getLogger("transformers").warning("library warning line")
logging.getLogger("learner.weight_export").info("oirl info line")
logging.getLogger("actors.engine_pool").warning("oirl warning line")
warnings.warn("python warning line")
os.write(2, b"raw fd line\\n")
subprocess.run([sys.executable, "-c", "print('child process line')"], check=True)
"""
EVERYTHING = ("plain stdout line", "plain stderr line", "library info line", "library warning line",
              "oirl info line", "oirl warning line", "python warning line", "raw fd line", "child process line")


def _actor(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ACTOR, path], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def test_an_actors_output_goes_to_its_file_and_only_oirl_warnings_to_the_terminal(tmp_path):
    log = tmp_path / "logs" / "rollout-0.log"
    proc = _actor(str(log))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == ["WARNING actors.engine_pool: oirl warning line"]
    text = log.read_text()
    for line in EVERYTHING:
        assert line in text, line
    # A restarted actor (a new process) appends: the first one's lines stay.
    assert _actor(str(log)).returncode == 0
    assert log.read_text().startswith(text) and log.read_text().count("child process line") == 2


def test_a_log_path_that_cannot_be_written_warns_and_keeps_the_output(tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    proc = _actor(str(tmp_path / "not-a-folder" / "rollout-0.log"))
    assert proc.returncode == 0, proc.stderr
    assert f"cannot write this actor's log to {tmp_path}/not-a-folder/rollout-0.log" in proc.stderr
    assert "plain stdout line" in proc.stdout and "oirl warning line" in proc.stderr


def test_without_a_file_the_actor_keeps_its_output(tmp_path):
    proc = _actor("")
    assert proc.returncode == 0, proc.stderr
    both = proc.stdout + proc.stderr
    for line in ("plain stdout line", "plain stderr line", "oirl warning line", "python warning line", "raw fd line",
                 "child process line"):
        assert line in both, line
    assert not list(tmp_path.iterdir())


DRIVER = """
import logging, sys
import ray  # its own logger and handler, as in the CLI
from oirl.logs import configure_driver
configure_driver(sys.argv[1], sys.argv[2] == "verbose")
logging.getLogger("oirl.driver").info("oirl info line")
logging.getLogger("actors.engine_pool").warning("oirl warning line")
logging.getLogger("transformers").warning("library warning line")
logging.getLogger("ray").info("ray info line")
logging.getLogger("ray").error("ray error line")
logging.getLogger("deepspeed").error("library error line")
"""


def _driver(log, mode: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(log), mode], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_the_driver_shows_oirls_records_and_errors_and_files_everything(tmp_path):
    log = tmp_path / "logs" / "driver.log"
    proc = _driver(log, "quiet")
    shown = proc.stderr
    for line in ("oirl info line", "oirl warning line", "ray error line", "library error line"):
        assert line in shown, line
    for line in ("library warning line", "ray info line"):
        assert line not in shown, line
    text = log.read_text()
    for line in ("oirl info line", "oirl warning line", "library warning line", "ray info line", "ray error line",
                 "library error line"):
        assert line in text, line


def test_verbose_shows_everything_on_the_terminal(tmp_path):
    proc = _driver(tmp_path / "driver.log", "verbose")
    for line in ("oirl info line", "library warning line", "ray info line", "library error line"):
        assert line in proc.stderr, line
