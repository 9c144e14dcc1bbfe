"""oirl command line.

    oirl train [--config F] [--out DIR] [--resume] [--address ADDR] [dotted.overrides ...]
    oirl prepare-model [--config F]      # convert/build the model once (cached)
    oirl show-config [--config F] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from oirl.config import REPO_ROOT, ConfigError, load_config


def _config_path(arg: str | None) -> str:
    return arg or str(REPO_ROOT / "configs" / "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oirl", description="Distributed RLHF: vLLM actors + DeepSpeed PPO on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="run PPO (embedded local Ray unless an address is given)")
    p_train.add_argument("--config", help="YAML recipe (default: configs/demo.yaml)")
    p_train.add_argument("--out", help="output directory (default: runs/<config name>)")
    p_train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p_train.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded)")
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_model = sub.add_parser("prepare-model", help="convert or build the configured model into the cache")
    p_model.add_argument("--config")
    p_show = sub.add_parser("show-config", help="print the resolved, validated config")
    p_show.add_argument("--config")
    args, rest = parser.parse_known_args(argv)

    logging.basicConfig(level=os.environ.get("OIRL_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(_config_path(args.config), rest)
    except ConfigError as e:
        print(f"oirl: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "show-config":
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.command == "prepare-model":
        from oirl.models import resolve_model

        print(resolve_model(cfg.model))
        return 0

    from oirl.data import DatasetError
    from oirl.driver import train

    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    out = args.out or str(Path("runs") / Path(_config_path(args.config)).stem)
    try:
        final = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    except (DatasetError, FileNotFoundError) as e:
        print(f"oirl: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: final[k] for k in ("iteration", "reward/mean", "kl/mean", "sync/seconds") if k in final}))
    print(f"oirl: wrote {out}/metrics.jsonl, {out}/curves.png and the final policy in {out}/final")
    return 0


if __name__ == "__main__":
    sys.exit(main())
