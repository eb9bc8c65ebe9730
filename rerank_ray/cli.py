"""The ``rerank-ray`` command: ``run`` a job, or a self-contained ``demo``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from rerank_ray.config import ConfigError, JobConfig

_BOOL_TRUE_DEFAULT = {"s3_verify_tls", "fused_kernels"}


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``JobConfig`` field (``--max-length`` for ``max_length``), plus --config.

    Flags default to "not given", so values from a --config YAML file are only overridden
    by flags actually passed.
    """
    parser.add_argument("--config", help="YAML file of job settings; flags override it.")
    for f in dataclasses.fields(JobConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in ("bool",) or isinstance(f.default, bool):
            if f.name in _BOOL_TRUE_DEFAULT:
                parser.add_argument(
                    "--no-" + f.name.replace("_", "-"),
                    dest=f.name,
                    action="store_const",
                    const=False,
                    default=argparse.SUPPRESS,
                    help=f"Turn off: {help_text}",
                )
            else:
                parser.add_argument(
                    flag,
                    dest=f.name,
                    action="store_const",
                    const=True,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text)


def config_from_args(args: argparse.Namespace, extra_keys: set[str] | None = None) -> JobConfig:
    """Merge --config YAML and flags into a validated ``JobConfig``."""
    skip = {"command", "config", "func", *(extra_keys or set())}
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in skip}
    if getattr(args, "config", None):
        return JobConfig.from_yaml(args.config, overrides)
    return JobConfig.from_dict(overrides, source="command-line flags")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerank-ray",
        description="Distributed batch reranking of (query, document) pairs on Ray Data.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="Run a rerank job.")
    add_job_flags(run_p)
    demo_p = sub.add_parser(
        "demo", help="Make sample shards and run the job on a local Ray instance."
    )
    demo_p.add_argument("--workdir", default="rerank_demo", help="Where the demo writes files.")
    demo_p.add_argument("--rows", type=int, default=2000, help="Sample pairs to generate.")
    demo_p.add_argument(
        "--model", default=None, help="Model to use; default: try the default hub model."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from rerank_ray import pipeline, source, storage

    expected = (ConfigError, source.InputError, storage.StorageError, storage.ModelLoadError)
    try:
        if args.command == "run":
            pipeline.run(config_from_args(args))
        else:
            from rerank_ray.demo import run_demo

            run_demo(Path(args.workdir), rows=args.rows, model=args.model)
    except expected as err:
        print(f"rerank-ray: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
