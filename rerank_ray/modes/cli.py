"""Command line of the job modes: the job's own flags plus the mode's, and ``--mode-config``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from rerank_ray import cli, logs
from rerank_ray.modes.config import add_mode_flags, mode_config_from_args
from rerank_ray.modes.registry import MODES, Mode
from rerank_ray.modes.run import run_mode
from rerank_ray.typed_config import ConfigError


def _add_flags(parser: argparse.ArgumentParser, mode: Mode) -> None:
    cli.add_job_flags(parser)
    parser.add_argument(
        "--mode-config",
        help=f"YAML file of {mode.config_cls.__name__} settings; mode flags override it.",
    )
    add_mode_flags(parser, mode.config_cls)
    parser.set_defaults(mode=mode.name)


def add_mode_parser(sub, mode: Mode) -> None:
    """``rerank-ray <mode>``: a subcommand taking the job's and the mode's flags."""
    _add_flags(sub.add_parser(mode.name, help=mode.description), mode)


def build_parser(mode_name: str) -> argparse.ArgumentParser:
    """The parser of ``jobs/<mode>.py``."""
    mode = MODES[mode_name]
    parser = argparse.ArgumentParser(description=mode.description)
    cli.add_output_flags(parser)
    _add_flags(parser, mode)
    return parser


def run_mode_args(args: argparse.Namespace) -> None:
    """Build the job and mode configs from parsed flags, run the mode, print its stats."""
    mode = MODES[args.mode]
    mode_keys = {f.name for f in fields(mode.config_cls)}
    base: dict = {}
    if args.mode_config:
        try:
            base = yaml.safe_load(Path(args.mode_config).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"Cannot read --mode-config {args.mode_config}: {err}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"{args.mode_config} must hold a YAML mapping of keys to values.")
    source = f"{args.mode_config} and flags" if args.mode_config else "flags"
    mode_cfg = mode_config_from_args(mode.config_cls, args, base, source)
    skip = mode_keys | {"mode_config", "mode", "verbose"}
    job_cfg = cli.config_from_args(args, extra_keys=skip)
    report = run_mode(mode, job_cfg, mode_cfg)
    print(
        json.dumps({"mode": mode.name, "run_id": report["run_id"], **report["stats"]}), flush=True
    )


def main(mode_name: str, argv: list[str] | None = None) -> int:
    """``jobs/<mode>.py``: parse flags, run the mode; exit 0, or 2 with one line."""
    args = build_parser(mode_name).parse_args(argv)
    logs.configure(cli.output_level(args))
    return cli.run_main(lambda: run_mode_args(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
