"""oirl command line.

    oirl train [--config F] [--out DIR] [--resume] [--address ADDR] [dotted.overrides ...]
    oirl prepare-model [--config F]      # convert/build the model once (cached)
    oirl show-config [--config F] [--provenance] [overrides ...]
    oirl bench rollout|sync|e2e|scaling|memory|gsm8k [--quick] --out DIR   # benchmarks/, JSON under DIR
    oirl sft --out DIR [--data F] [--model M] [key=value ...]     # behaviour cloning (learner/sft.py)
    oirl pipeline --config F [--out DIR] [overrides ...]          # SFT -> reward model -> PPO (oirl/pipeline.py)
    oirl prompt-oirl collect|train|select|eval ...   # see oirl/prompt_oirl/cli.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from oirl.config import OFFLINE_ENV, REPO_ROOT, ConfigError, ModelConfig, load_config

# `oirl bench <name>`: the module that runs it (from the repository root; anything that starts Ray wants
# deploy/loopback.sh around the command) and whether it has a --quick mode.
BENCHMARKS = {"rollout": ("benchmarks.rollout", True), "sync": ("benchmarks.sync", True),
              "gsm8k": ("benchmarks.gsm8k_algorithms", False), "memory": ("benchmarks.memory", True),
              "scaling": ("benchmarks.scaling", True), "e2e": ("benchmarks.e2e", True)}


def _bench(name: str, out: str, quick: bool, rest: list[str]) -> int:
    import subprocess

    module, has_quick = BENCHMARKS[name]
    if quick and not has_quick:
        print(f"oirl: benchmark {name!r} has no --quick mode; pass its own size options instead", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", module, "--out", out, *(["--quick"] if quick else []), *rest]
    return subprocess.run(cmd, cwd=REPO_ROOT).returncode


def _show_provenance(cfg, path: str, overrides: list[str]) -> None:
    """`oirl show-config --provenance`: field, value (as JSON), and where the value came from."""
    from oirl.config import value_sources

    rows = [(key, json.dumps(value), source) for key, (value, source) in value_sources(cfg, path, overrides).items()]
    key_width, value_width = max(len(r[0]) for r in rows), min(48, max(len(r[1]) for r in rows))
    print(f"# config file: {path}")
    for key, value, source in rows:
        print(f"{key:<{key_width}}  {value:<{value_width}}  {source}")


def _config_path(arg: str | None) -> str:
    return arg or str(REPO_ROOT / "configs" / "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oirl", description="Distributed RLHF: vLLM actors + DeepSpeed PPO on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="run PPO (embedded local Ray unless an address is given)")
    p_train.add_argument("--config", help="YAML recipe (default: configs/demo.yaml)")
    p_train.add_argument("--out", help="output directory (default: runs/<config name>)")
    p_train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p_train.add_argument("--auto-resume", action="store_true",
                         help="continue from the last committed checkpoint in --out if there is one, else start: "
                              "for jobs that are retried (a RayJob's backoffLimit, a preempted node)")
    p_train.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded)")
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_train.add_argument("--verbose", action="store_true",
                         help="every process's output on the terminal (vLLM, DeepSpeed, Ray, ...); by default each "
                              "actor writes to its role's file under --out/logs and the terminal shows oirl's "
                              "messages, warnings and errors")
    p_model = sub.add_parser("prepare-model", help="convert or build the configured model into the cache")
    p_model.add_argument("--config")
    p_show = sub.add_parser("show-config", help="print the resolved, validated config")
    p_show.add_argument("--config")
    p_show.add_argument("--provenance", action="store_true",
                        help="one field a line, with where its value came from: default, algorithm recipe, config "
                             "file or command line")
    p_plan = sub.add_parser("plan", help="print the placement plan; --check validates KubeRay manifests against it")
    p_plan.add_argument("--config")
    p_plan.add_argument("--check", nargs="*", default=[], help="RayCluster/RayJob manifests to check")
    p_plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    p_plan.add_argument("--memory", action="store_true",
                        help="the bytes each role needs per GPU (oirl/memory_plan.py) for the config's model and "
                             "1.5B-32B Llama/Qwen shapes, and what to change where it does not fit; exits 1 if a "
                             "model planned by name (--model, or the config's own) does not fit")
    p_plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU for --memory (80)")
    p_plan.add_argument("--model", action="append", default=[], metavar="NAME|FOLDER",
                        help="with --memory: plan this model instead of the config's and the table (repeatable): "
                             "a table name (qwen2.5-7b, llama-3.1-8b, ...) or an HF folder / config.json")
    p_sub = sub.add_parser("submit", help="submit `oirl train` as a Ray job to a running cluster")
    p_sub.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                       help="Ray dashboard/job API address (default: http://127.0.0.1:8265)")
    p_sub.add_argument("--config", required=True)
    p_sub.add_argument("--out", required=True, help="output directory on the cluster (a checkpoint volume)")
    p_sub.add_argument("--working-dir", default=None,
                       help="upload this directory as the job's code (default: none, the image's code is used)")
    p_sub.add_argument("--no-wait", action="store_true", help="return after submission")
    p_sub.add_argument("--timeout", type=float, default=24 * 3600, help="longest wait for the job, seconds")
    p_sub.add_argument("--resume", action="store_true", help="the job continues the run in --out (oirl train --resume)")
    p_sub.add_argument("--auto-resume", action="store_true", help="the job continues the run in --out if it has a "
                                                                   "committed checkpoint, else starts it")
    p_srv = sub.add_parser("serve-reward", help="serve the configured reward over HTTP (JSON API)")
    p_srv.add_argument("--config")
    p_srv.add_argument("--host", default="127.0.0.1")
    p_srv.add_argument("--port", type=int, default=8000)
    p_srv.add_argument("--token-file", help="file holding the bearer token clients must send (default: the token in "
                                             "$OIRL_REWARD_TOKEN; one of them is required off loopback)")
    p_srv.add_argument("--token", help=argparse.SUPPRESS)  # refused: a token on a command line shows in `ps`
    p_rm = sub.add_parser("train-rm", help="train a reward model (Bradley-Terry) on preference pairs")
    p_rm.add_argument("--data", required=True, help="JSONL or Parquet with prompt, chosen, rejected")
    p_rm.add_argument("--out", required=True)
    p_rm.add_argument("--backbone", default="minilm", help="HF folder, 'minilm' or 'tiny'")
    p_pref = sub.add_parser("make-preferences", help="GSM8K reference (chosen) vs wrong sampled solution (rejected)")
    p_pref.add_argument("--config")
    p_pref.add_argument("--out", required=True, help="Parquet file to write")
    p_pref.add_argument("--questions", type=int, default=256)
    p_pref.add_argument("--samples", type=int, default=2, help="samples per question (one wrong one is kept)")
    p_bench = sub.add_parser("bench", help="run a benchmark (benchmarks/<name>.py); it writes its JSON under --out DIR")
    p_bench.add_argument("name", choices=sorted(BENCHMARKS))
    p_bench.add_argument("--out", required=True)
    p_bench.add_argument("--quick", action="store_true", help="a few minutes here (where the benchmark has it)")
    p_sft = sub.add_parser("sft", help="supervised fine-tuning (behaviour cloning) on GSM8K demonstrations")
    p_sft.add_argument("--out", required=True, help="HF folder to write (plus metrics.json)")
    p_sft.add_argument("--data", help="rows with 'question' and 'answer', in any data.path format (default: "
                                      "GSM8K train, data/gsm8k/train.jsonl)")
    p_sft.add_argument("--model", help="HF folder, 'smollm2-135m' or 'tiny' (default: smollm2-135m)")
    p_pipe = sub.add_parser("pipeline", help="SFT -> reward model -> PPO from one config; complete stages skipped")
    p_pipe.add_argument("--config", default=str(REPO_ROOT / "configs" / "pipeline.yaml"))
    p_pipe.add_argument("--out", help="output directory (default: runs/<config name>)")
    p_poirl = sub.add_parser("prompt-oirl", add_help=False,
                             help="Prompt-OIRL: collect | train | select | eval (per-query prompt selection)")
    p_poirl.add_argument("poirl_args", nargs=argparse.REMAINDER)
    args, rest = parser.parse_known_args(argv)
    for key, value in OFFLINE_ENV.items():  # set before transformers/huggingface_hub are imported
        os.environ.setdefault(key, value)

    logging.basicConfig(level=os.environ.get("OIRL_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "prompt-oirl":
        from oirl.prompt_oirl.cli import main as prompt_oirl_main

        return prompt_oirl_main(args.poirl_args + rest)
    if args.command == "train-rm":
        return _train_rm(args.data, args.out, args.backbone, rest)
    if args.command == "bench":
        return _bench(args.name, args.out, args.quick, rest)
    if args.command == "sft":
        return _sft(args.out, {"data": args.data, "model": args.model}, rest)
    if args.command == "pipeline":
        return _pipeline(args.config, args.out or str(Path("runs") / Path(args.config).stem), rest)
    if args.command == "submit":
        from oirl.submit import submit

        resume = ["--resume"] * args.resume + ["--auto-resume"] * args.auto_resume
        return submit(args.address, args.config, args.out, rest, args.working_dir, not args.no_wait, args.timeout,
                      resume)
    try:
        cfg = load_config(_config_path(args.config), rest, check_paths=args.command == "train")
    except ConfigError as e:
        print(f"oirl: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "show-config":
        if args.provenance:
            _show_provenance(cfg, _config_path(args.config), rest)
        else:
            print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.command == "plan" and args.memory:
        return _plan_memory(cfg, args.gpu_memory_gib, args.model, args.json)
    if args.command == "plan":
        return _plan(cfg, args.check, args.json)
    if args.command == "make-preferences":
        from reward_server.preferences import build_gsm8k_preferences

        with _ray_session(cfg.ray_address):
            stats = build_gsm8k_preferences(cfg, args.out, args.questions, args.samples, cfg.seed)
        print(json.dumps(stats))
        return 0
    if args.command == "serve-reward":
        return _serve_reward(cfg, args.host, args.port, args.token_file, args.token)
    if args.command == "prepare-model":
        from oirl.models import resolve_model

        print(resolve_model(cfg.model))
        return 0

    from oirl.data import DatasetError
    from oirl.driver import train
    from oirl.remote import RemoteError
    from oirl.sync import SyncError

    if args.address:  # the flag wins over the config's ray_address and the environment
        os.environ["RAY_ADDRESS"] = args.address
        cfg = dataclasses.replace(cfg, ray_address=args.address)
    out = args.out or str(Path("runs") / Path(_config_path(args.config)).stem)
    from oirl.checkpoint import read_commit

    try:
        committed = read_commit(Path(out) / "checkpoints")
    except FileNotFoundError as e:
        print(f"oirl: {e}", file=sys.stderr)
        return 2
    if committed is not None and not (args.resume or args.auto_resume):
        print(f"oirl: {out} holds a run with a committed checkpoint of iteration {committed['iteration']}; starting "
              "afresh there would overwrite its metrics and checkpoints. Continue it with --resume (or "
              "--auto-resume), give another --out, or remove it to start over", file=sys.stderr)
        return 2
    from oirl.logs import configure_driver, log_dir, role_log

    logs = log_dir(out)
    configure_driver(role_log(str(logs), "driver"), args.verbose, os.environ.get("OIRL_LOG_LEVEL", "INFO"))
    try:
        final = train(cfg, out, resume=args.resume or committed is not None, progress=not args.no_progress,
                      actor_logs=not args.verbose)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        print(f"oirl: {e}", file=sys.stderr)
        return 2
    except (RemoteError, SyncError, TimeoutError) as e:
        from oirl.checkpoint import read_commit

        committed = read_commit(Path(out) / "checkpoints")
        where = (f"the last committed checkpoint is iteration {committed['iteration']}: continue with the same "
                 "command plus --resume" if committed else "no checkpoint was committed yet: rerun from the start")
        print(f"oirl: the run failed: {e}\noirl: {where}", file=sys.stderr)
        print(f"oirl: every role's output is in {logs}/ (driver.log, rollout-<i>.log, learner-<r>.log, reward.log)"
              if not args.verbose else f"oirl: the driver's log is {logs}/driver.log", file=sys.stderr)
        return 1
    print(json.dumps({k: final[k] for k in ("iteration", "reward/mean", "reward/raw_mean", "kl/mean", "sync/seconds")
                      if k in final}))
    print(f"oirl: wrote {out}/metrics.jsonl, {out}/curves.png and the final policy in {out}/final")
    return 0


@contextlib.contextmanager
def _ray_session(address: str = ""):
    """Join RAY_ADDRESS/address when given, else an embedded local cluster; disconnect (or stop it) on exit."""
    import ray

    from oirl.driver import start_ray

    start_ray(address, max(4, os.cpu_count() or 1))
    try:
        yield
    finally:
        ray.shutdown()


def _train_rm(data: str, out: str, backbone: str, overrides: list[str]) -> int:
    from learner.reward_model import PreferenceDataError, RMConfig, train_reward_model
    from oirl.config import parse_overrides

    fields = {f.name: f for f in dataclasses.fields(RMConfig)}
    kwargs: dict = {"data": data, "backbone": backbone}
    for key, value in parse_overrides(overrides).items():
        if key not in fields:
            print(f"oirl: unknown train-rm option '{key}'; known: {', '.join(fields)}", file=sys.stderr)
            return 2
        kwargs[key] = type(fields[key].default)(value)
    cfg = RMConfig(**kwargs)
    try:
        from learner.reward_model import read_preferences

        read_preferences(cfg.data)  # fail on bad rows before any actor starts
        with _ray_session():
            metrics = train_reward_model(cfg, out)
    except (PreferenceDataError, FileNotFoundError) as e:
        print(f"oirl: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: metrics[k] for k in ("heldout_pairwise_accuracy", "heldout_pairwise_accuracy_before_training",
                                              "train_pairs", "heldout_pairs", "train_pairs_per_s")}))
    return 0


def _sft(out: str, given: dict, overrides: list[str]) -> int:
    from learner.sft import SFTConfig, train_sft, validate_sft
    from oirl.config import _build, parse_overrides
    from oirl.data import DatasetError

    try:
        cfg = _build(SFTConfig, {**parse_overrides(overrides), **{k: v for k, v in given.items() if v}}, "")
        validate_sft(cfg)
    except ConfigError as e:
        print(f"oirl: config error: {e}", file=sys.stderr)
        return 2
    try:
        from transformers import AutoTokenizer

        from learner.sft import read_demonstrations
        from oirl.models import resolve_model

        read_demonstrations(cfg, AutoTokenizer.from_pretrained(resolve_model(ModelConfig(path=cfg.model))))
        with _ray_session():  # rows were checked above: bad input fails before any actor starts
            metrics = train_sft(cfg, out)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        print(f"oirl: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: metrics[k] for k in ("heldout_loss_before", "heldout_loss", "train_loss", "train_rows",
                                              "heldout_rows", "seconds")}))
    print(f"oirl: wrote the policy to {out} (model.path for `oirl train`, --backbone for `oirl train-rm`)")
    return 0


def _pipeline(config: str, out: str, overrides: list[str]) -> int:
    from oirl.data import DatasetError
    from oirl.pipeline import format_summary, load_pipeline_config, run_pipeline
    from oirl.remote import RemoteError
    from oirl.sync import SyncError

    try:
        cfg = load_pipeline_config(config, overrides)
        summary = run_pipeline(cfg, out)
    except ConfigError as e:
        print(f"oirl: config error: {e}", file=sys.stderr)
        return 2
    except (DatasetError, FileNotFoundError, ValueError) as e:
        print(f"oirl: {e}", file=sys.stderr)
        return 2
    except (RemoteError, SyncError, TimeoutError) as e:
        print(f"oirl: the pipeline failed: {e}\noirl: rerun the same command: complete stages are skipped and PPO "
              "resumes from its last committed checkpoint", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def _serve_reward(cfg, host: str, port: int, token_file: str | None, token_arg: str | None) -> int:
    """Serve cfg.reward over HTTP. Everything a user can get wrong is checked before a model loads; the token is
    read from --token-file or $OIRL_REWARD_TOKEN and never printed."""
    from oirl.config import resolve_path
    from oirl.models import resolve_model
    from reward_server.http import ServerConfig, is_loopback, make_server
    from reward_server.reward_worker import RewardWorker, read_token_file

    if token_arg is not None:
        print("oirl: --token is not accepted: a token on the command line is visible to every user of the machine "
              "(ps, shell history); use --token-file FILE or the environment variable OIRL_REWARD_TOKEN",
              file=sys.stderr)
        return 2
    rw = cfg.reward
    if rw.model_path and not (resolve_path(rw.model_path) / "config.json").is_file():
        print(f"oirl: config error: reward.model_path={rw.model_path!r} is not a model folder (no config.json in "
              f"{resolve_path(rw.model_path)}); train one with `oirl train-rm --data PREFS --out DIR` and point "
              "reward.model_path at DIR", file=sys.stderr)
        return 2
    try:
        token = (read_token_file(token_file, "--token-file") if token_file
                 else os.environ.get("OIRL_REWARD_TOKEN", "").strip())
        if not token and not is_loopback(host):  # checked before any model loads
            raise ValueError(f"refusing to serve rewards on {host} without a token: pass --token-file FILE or set "
                             "$OIRL_REWARD_TOKEN (clients send 'Authorization: Bearer <token>'), or bind 127.0.0.1")
        if rw.normalize:
            logging.getLogger(__name__).warning(
                "reward.normalize: the HTTP front never updates running statistics (clients must not move each "
                "other's rewards), so rewards are served unnormalised; normalise in the trainer instead")
        worker = RewardWorker(rw, str(resolve_model(cfg.model)))
        server = make_server(worker, ServerConfig(host=host, port=port, token=token))
    except ValueError as e:
        print(f"oirl: {e}", file=sys.stderr)
        return 2
    print(f"oirl: serving rewards on http://{host}:{server.server_address[1]} (POST /score, POST /get_reward "
          f"for OpenRLHF, GET /health, GET /metrics){'; clients must send the bearer token' if token else ''}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _plan_memory(cfg, gpu_memory_gib: float, models: list[str], as_json: bool) -> int:
    from oirl.memory_plan import format_memory_plan, memory_plans

    try:
        plans, notes = memory_plans(cfg, int(gpu_memory_gib * (1 << 30)), models)
    except ValueError as e:
        print(f"oirl: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps({"gpu_memory_gib": gpu_memory_gib, "models": [p.to_dict() for p in plans],
                          "notes": notes}, indent=2))
    else:
        print(format_memory_plan(plans, notes))
    # Judged: the models asked for by name, or the config's own; the table is for reading
    judged = plans if models else [p for p in plans if p.source.startswith("the config's model")]
    return 0 if all(p.fits() for p in judged) else 1


def _plan(cfg, manifests: list[str], as_json: bool) -> int:
    import ray

    from oirl.manifests import load_documents
    from oirl.plan import check_documents, format_plan, plan_json

    print(plan_json(cfg) if as_json else format_plan(cfg))
    failed = False
    for path in manifests:
        for label, problems in check_documents(cfg, load_documents(path), ray.__version__):
            name = f"{path} ({label})"
            if problems:
                failed = True
                print(f"FAIL {name}")
                for p in problems:
                    print(f"  - {p}")
            else:
                print(f"ok   {name}: schema valid, fits the plan")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
