"""The job modes as data: what a mode is made of, and the two there are (``MODES``).

A mode is its typed config, what a block of whole queries becomes (``groups.py``), and what
it builds besides the rows: exports, partial statistics and the report (``finish.py``).
``run.py`` drives every mode the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from rerank_ray import schema
from rerank_ray.config import JobConfig
from rerank_ray.modes import finish
from rerank_ray.modes.config import LabelConfig, NightlyConfig
from rerank_ray.modes.groups import labeling_group, nightly_group
from rerank_ray.modes.labeling import MODE_FIELDS
from rerank_ray.modes.ranking import RANK_COLUMNS
from rerank_ray.modes.stage import Export


@dataclass(frozen=True)
class Mode:
    """A job mode as data: its typed config, what a block of whole queries becomes (rows,
    exports, partial statistics: on the workers), and the report built from the merged
    partials on the driver."""

    name: str
    config_cls: type
    description: str
    group: Callable[[pa.Table, Any], pa.Table]  # whole queries' rows -> as many rows, marked
    partials: Callable[..., dict[str, Any]]  # (rows, cfg, value_range) -> addable objects
    finish: Callable[..., dict[str, Any]]  # (out, manifest, merged, exports, cfg) -> report
    exports: Callable[[Any], tuple[Export, ...]] = lambda cfg: ()
    value_range_column: Callable[[Any], str | None] = lambda cfg: None  # its run-wide range
    filtered_reasons: tuple[str, ...] = ()
    check: Callable[[JobConfig, Any], None] | None = None  # before anything runs
    columns: tuple[str, ...] = ()  # the columns the mode adds (refused as input columns)


NIGHTLY = Mode(
    name="nightly",
    config_cls=NightlyConfig,
    description="Nightly rerank: rank every query, keep the top K.",
    group=nightly_group,
    partials=finish.nightly_partials,
    finish=finish.nightly_finish,
    filtered_reasons=(schema.RejectReason.BELOW_TOP_K,),
    columns=RANK_COLUMNS,
)
LABELING = Mode(
    name="labeling",
    config_cls=LabelConfig,
    description="Training-data labeling: labels, hard negatives, FlagEmbedding / "
    "sentence-transformers exports and a score report.",
    group=labeling_group,
    partials=finish.labeling_partials,
    finish=finish.labeling_finish,
    exports=finish.labeling_exports,
    value_range_column=finish.labeling_range_column,
    check=finish.check_labeling,
    columns=tuple(f.name for f in MODE_FIELDS),
)
MODES = {mode.name: mode for mode in (NIGHTLY, LABELING)}
