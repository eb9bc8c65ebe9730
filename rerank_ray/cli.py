"""Every entrypoint's command line: ``rerank-ray run|demo|nightly|label``, ``jobs/*.py``,
and the one error handler they share."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from rerank_ray import logs
from rerank_ray.config import JobConfig
from rerank_ray.errors import find_rerank_error

_BOOL_TRUE_DEFAULT = {"s3_verify_tls", "fused_kernels"}


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``JobConfig`` field (``--max-length`` for ``max_length``), plus --config.

    Flags default to "not given", so values from a --config YAML file are only overridden
    by flags actually passed.
    """
    parser.add_argument("--config", help="YAML file of job settings; flags override it.")
    for f in dataclasses.fields(JobConfig):
        flag = "--" + f.name.replace("_", "-")
        # argparse formats help with %: a literal % in a help text must be doubled.
        help_text = f.metadata.get("help", "").replace("%", "%%")
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
            shown = f.default if f.default is not dataclasses.MISSING else "required"
            if f.default_factory is not dataclasses.MISSING:
                shown = ",".join(f.default_factory())
            parser.add_argument(
                flag,
                dest=f.name,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {shown})" if shown is not None else help_text,
            )


def config_from_args(args: argparse.Namespace, extra_keys: set[str] | None = None) -> JobConfig:
    """Merge --config YAML and flags into a validated ``JobConfig``."""
    skip = {"command", "config", "verbose", "quiet", *(extra_keys or set())}
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in skip}
    if getattr(args, "config", None):
        return JobConfig.from_yaml(args.config, overrides)
    return JobConfig.from_dict(overrides, source="command-line flags")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` and ``--quiet``: how much a run prints (``logs.LEVELS``)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--verbose",
        action="store_true",
        help="Print everything Ray prints, its progress bars included, and full tracebacks "
        "of errors (for bug reports).",
    )
    group.add_argument(
        "--quiet",
        action="store_true",
        help="Print only warnings, errors and the summary line: no progress line.",
    )


def output_level(args: argparse.Namespace) -> str:
    """The ``logs`` level the flags ask for."""
    if getattr(args, "verbose", False):
        return "verbose"
    return "quiet" if getattr(args, "quiet", False) else "normal"


def build_parser() -> argparse.ArgumentParser:
    """The ``rerank-ray`` parser: ``run``, ``demo`` and the job modes."""
    from rerank_ray.modes.cli import add_mode_parser
    from rerank_ray.modes.registry import MODES

    parser = argparse.ArgumentParser(
        prog="rerank-ray",
        description="Distributed batch reranking of (query, document) pairs on Ray Data.",
    )
    add_output_flags(parser)
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
    for mode in MODES.values():
        add_mode_parser(sub, mode)
    return parser


def run_main(body, verbose: bool = False) -> int:
    """Run ``body()`` (an entrypoint's work) and turn every error this project raises on
    purpose, also when Ray re-raises it from an actor or task, into one line on stderr and
    exit status 2. Anything else is a bug: its traceback is kept."""
    try:
        body()
    except Exception as err:
        expected = find_rerank_error(err)
        if expected is None:
            raise
        if verbose:
            logging.getLogger("rerank_ray").exception("full traceback (--verbose)")
        message = " ".join(str(expected).split())
        print(f"rerank-ray: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rerank-ray: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    """``rerank-ray`` (and ``jobs/rerank.py``): parse, run, exit 0 or 2 (with one line)."""
    args = build_parser().parse_args(argv)
    logs.configure(output_level(args))

    def body() -> None:
        if args.command == "run":
            from rerank_ray import pipeline

            pipeline.run(config_from_args(args))
        elif args.command == "demo":
            from rerank_ray.demo import run_demo

            run_demo(Path(args.workdir), rows=args.rows, model=args.model)
        else:
            from rerank_ray.modes.cli import run_mode_args

            run_mode_args(args)

    return run_main(body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
