"""Command line of the job modes: the job's own flags plus the mode's, and ``--mode-config``."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import yaml

from rerank_ray import cli
from rerank_ray.config import ConfigError
from rerank_ray.modes.config import (
    LabelConfig,
    NightlyConfig,
    add_mode_flags,
    mode_config_from_args,
)
from rerank_ray.modes.run import run_labeling, run_nightly

MODES = {
    "nightly": (NightlyConfig, run_nightly, "Nightly rerank: rank every query, keep the top K."),
    "labeling": (
        LabelConfig,
        run_labeling,
        "Training-data labeling: labels, hard negatives, FlagEmbedding / "
        "sentence-transformers exports and a score report.",
    ),
}


def build_parser(mode: str) -> argparse.ArgumentParser:
    cls, _, description = MODES[mode]
    parser = argparse.ArgumentParser(description=description)
    cli.add_job_flags(parser)
    parser.add_argument(
        "--mode-config", help=f"YAML file of {cls.__name__} settings; mode flags override it."
    )
    add_mode_flags(parser, cls)
    return parser


def main(mode: str, argv: list[str] | None = None) -> int:
    """Parse flags, run the mode, print its report's stats. Returns the exit status."""
    cls, run, _ = MODES[mode]
    args = build_parser(mode).parse_args(argv)
    mode_keys = {f.name for f in fields(cls)}
    base: dict = {}
    if args.mode_config:
        base = yaml.safe_load(Path(args.mode_config).read_text()) or {}
        if not isinstance(base, dict):
            raise ConfigError(f"{args.mode_config} must hold a YAML mapping of keys to values.")
    source = f"{args.mode_config} and flags" if args.mode_config else "flags"
    mode_cfg = mode_config_from_args(cls, args, base, source)
    job_cfg = cli.config_from_args(args, extra_keys=mode_keys | {"mode_config"})
    report = run(job_cfg, mode_cfg)
    print(json.dumps({"mode": mode, "run_id": report["run_id"], **report["stats"]}), flush=True)
    return 0
