"""Typed, frozen configs of the two job modes: nightly top-k reranking and training-data labeling.

They mirror ``rerank_ray.config.JobConfig``: validated when built, unknown keys rejected with the
closest valid name, one help line per field (``metadata["help"]``) from which flags are built.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from rerank_ray.typed_config import ConfigError, check_choice, field_kind, from_mapping

FIRST_STAGE_CHOICES = ("auto", "retrieval_rank", "retrieval_score", "none")
LABEL_SOURCES = ("threshold", "given")
SCORE_COLUMNS = ("score_norm", "score")
# The output formats of sentence-transformers' ``util.mine_hard_negatives``.
HARD_NEGATIVE_FORMATS = ("triplet", "n-tuple", "n-tuple-scores", "labeled-pair", "labeled-list")


def _f(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002
    aliases: tuple[str, ...] = (),
    **kw: Any,
) -> Any:
    metadata = {"help": help, "aliases": aliases}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass(frozen=True)
class NightlyConfig:
    """Nightly rerank: rank each query's candidates across all shards and keep the best K."""

    top_k: int | None = _f(10, help="Keep each query's best K candidates; none keeps all, ranked.")
    overlap_k: int | None = _f(
        None,
        help="K of the first-stage overlap@K statistic; default top_k (10 when top_k is none).",
    )
    first_stage: str = _f(
        "auto",
        help="First-stage order to compare against: retrieval_rank, retrieval_score, none, or auto "
        "(retrieval_rank if present, else retrieval_score, else none).",
    )

    def __post_init__(self) -> None:
        check_choice("first_stage", self.first_stage, FIRST_STAGE_CHOICES)
        for key in ("top_k", "overlap_k"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"`{key}` is {value}; it must be a positive integer.")
        if self.top_k is not None and self.effective_overlap_k > self.top_k:
            # The comparison is computed from the kept rows, which only cover ranks 1..top_k.
            raise ConfigError(
                f"`overlap_k` ({self.overlap_k}) is larger than `top_k` ({self.top_k}); "
                "overlap@K needs every reranked row up to K: lower overlap_k or raise top_k."
            )

    @property
    def effective_overlap_k(self) -> int:
        """K of overlap@K: the configured one, else ``top_k``, else 10."""
        if self.overlap_k is not None:
            return self.overlap_k
        return self.top_k if self.top_k is not None else 10


@dataclass(frozen=True)
class LabelConfig:
    """Training-data labeling: positives, negatives and mined hard negatives per query."""

    label_source: str = _f(
        "threshold",
        help="threshold (positive >= pos_threshold, negative <= neg_threshold) or given "
        "(the input's is_positive column: true = positive, false = negative, null = unlabeled).",
    )
    score_column: str = _f(
        "score_norm",
        help="Score the thresholds and the margin apply to: score_norm (sigmoid, 0..1) or score "
        "(raw logit).",
    )
    pos_threshold: float = _f(0.7, help="Positive when score_column >= this (threshold labels).")
    neg_threshold: float = _f(0.3, help="Negative when score_column <= this (threshold labels).")
    hard_negative_min_rank: int = _f(10, help="Best rank (1 = best) a hard negative may have.")
    hard_negative_max_rank: int = _f(100, help="Worst rank a hard negative may have.")
    margin: float = _f(
        0.1,
        help="A hard negative scores at least this much below the query's lowest-scoring "
        "positive (on score_column); sentence-transformers' absolute_margin.",
        aliases=("absolute_margin",),
    )
    max_hard_negatives: int = _f(
        15, help="Hard negatives kept per query, best-ranked first (FlagEmbedding's default 15)."
    )
    max_positives: int | None = _f(
        None, help="Positives exported per query, best-ranked first; none exports all."
    )
    teacher_score: str = _f(
        "score",
        help="Score written as pos_scores/neg_scores and as distillation labels: score (raw "
        "logit, as FlagReranker.compute_score) or score_norm.",
    )
    first_stage: str = _f(
        "auto", help="First-stage rank column kept for reference (as in the nightly mode)."
    )
    report_thresholds: list[float] | None = _f(
        None,
        help="Thresholds of the report's count table; default 0.05..0.95 (score_norm) or 19 "
        "steps across the observed range (score).",
    )
    histogram_bins: int = _f(50, help="Bins of the report's score histogram.")
    relative_margin: float | None = _f(
        None,
        help="A hard negative scores at most (1 - this) times the query's lowest-scoring "
        "positive (sentence-transformers' relative_margin); none: no such filter.",
    )
    max_score: float | None = _f(
        None, help="A hard negative scores at most this (on score_column); none: no such filter."
    )
    hard_negative_format: str = _f(
        "triplet",
        help="sentence-transformers export format, as util.mine_hard_negatives writes it: "
        "triplet, n-tuple, n-tuple-scores, labeled-pair or labeled-list.",
    )

    def __post_init__(self) -> None:
        check_choice("label_source", self.label_source, LABEL_SOURCES)
        check_choice("score_column", self.score_column, SCORE_COLUMNS)
        check_choice("teacher_score", self.teacher_score, SCORE_COLUMNS)
        check_choice("first_stage", self.first_stage, FIRST_STAGE_CHOICES)
        if self.label_source == "threshold" and not self.neg_threshold < self.pos_threshold:
            raise ConfigError(
                f"`neg_threshold` ({self.neg_threshold}) must be below `pos_threshold` "
                f"({self.pos_threshold}) so that no row is both positive and negative."
            )
        if self.score_column == "score_norm":
            for key in ("pos_threshold", "neg_threshold"):
                value = getattr(self, key)
                if not 0.0 <= value <= 1.0:
                    raise ConfigError(
                        f"`{key}` is {value} but score_norm lies in 0..1: use a value in 0..1 "
                        "or set `score_column: score` for raw-logit thresholds."
                    )
        if not 1 <= self.hard_negative_min_rank <= self.hard_negative_max_rank:
            raise ConfigError(
                f"The hard-negative rank window is {self.hard_negative_min_rank}.."
                f"{self.hard_negative_max_rank}; it needs 1 <= hard_negative_min_rank <= "
                "hard_negative_max_rank."
            )
        check_choice("hard_negative_format", self.hard_negative_format, HARD_NEGATIVE_FORMATS)
        if self.margin < 0:
            raise ConfigError(f"`margin` is {self.margin}; it must be >= 0.")
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ConfigError(
                f"`relative_margin` is {self.relative_margin}; use a value in [0, 1) or none."
            )
        if self.max_hard_negatives < 1:
            raise ConfigError(f"`max_hard_negatives` is {self.max_hard_negatives}; use >= 1.")
        if self.max_positives is not None and self.max_positives < 1:
            raise ConfigError(f"`max_positives` is {self.max_positives}; use >= 1 or none.")
        if self.histogram_bins < 1:
            raise ConfigError(f"`histogram_bins` is {self.histogram_bins}; use >= 1.")
        if self.report_thresholds is not None and not self.report_thresholds:
            raise ConfigError("`report_thresholds` is empty; give at least one value or none.")


ModeConfig = TypeVar("ModeConfig", NightlyConfig, LabelConfig)


def mode_config_from_dict(
    cls: type[ModeConfig], data: Mapping[str, Any], source: str = "config"
) -> ModeConfig:
    """Build a mode config from a mapping; an unknown key is an error naming the closest one."""
    return from_mapping(cls, data, source, _coerce)


def add_mode_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of ``cls``; unset flags stay absent from the namespace, so
    they don't override values from a file (values stay strings; ``from_dict`` coerces)."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in fields(cls):
        flags = ["--" + name.replace("_", "-") for name in (f.name, *f.metadata["aliases"])]
        group.add_argument(
            *flags, dest=f.name, default=argparse.SUPPRESS, help=f.metadata.get("help")
        )


def mode_config_from_args(
    cls: type[ModeConfig],
    args: argparse.Namespace,
    base: Mapping[str, Any] | None = None,
    source: str = "flags",
) -> ModeConfig:
    """Build a mode config from ``base`` (e.g. a YAML mapping) overridden by the flags that
    ``add_mode_flags`` added and the command line set."""
    values = {str(k).replace("-", "_"): v for k, v in (base or {}).items()}
    values.update({f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
    return mode_config_from_dict(cls, values, source=source)


_NONE_WORDS = ("none", "null", "")


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    """Accept YAML/flag spellings (``"10"``, ``"0.5"``, ``"none"``, ``"0.3,0.5"``): stricter
    numbers than ``JobConfig``'s (a 2.5 for an integer is an error, not 2) and ``none`` for
    an optional value."""
    kind = field_kind(cls, name)
    optional = "None" in kind
    if value is None or (optional and isinstance(value, str) and value.lower() in _NONE_WORDS):
        if not optional:
            raise ConfigError(f"`{name}` in {source} cannot be none.")
        return None
    try:
        if kind.startswith("list[float]"):
            items = value.split(",") if isinstance(value, str) else list(value)
            return [float(v) for v in items if str(v).strip()]
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
    except (TypeError, ValueError):
        expected = "a list of numbers" if kind.startswith("list") else f"a number ({kind})"
        raise ConfigError(f"`{name}` in {source} is {value!r}; use {expected}.") from None
    if not isinstance(value, str):
        raise ConfigError(f"`{name}` in {source} is {value!r}; use a string.")
    return value
