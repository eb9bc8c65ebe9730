"""Mode configs: typed, frozen, validated; unknown keys name the closest valid one."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from rerank_ray.config import ConfigError
from rerank_ray.modes.config import (
    LabelConfig,
    NightlyConfig,
    add_mode_flags,
    mode_config_from_args,
    mode_config_from_dict,
)


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(
        ConfigError, match=r"Unknown key `top-kk` in job.yaml\. Did you mean `top_k`"
    ):
        mode_config_from_dict(NightlyConfig, {"top-kk": 5}, source="job.yaml")
    with pytest.raises(ConfigError, match="Did you mean `pos_threshold`"):
        mode_config_from_dict(LabelConfig, {"pos_treshold": 0.8})


def test_values_are_coerced_from_yaml_and_flag_spellings():
    cfg = mode_config_from_dict(
        LabelConfig,
        {
            "pos-threshold": "0.8",
            "neg_threshold": 0.2,
            "max_positives": "none",
            "max_hard_negatives": "4",
            "report_thresholds": "0.25, 0.5,0.75",
        },
    )
    assert (cfg.pos_threshold, cfg.neg_threshold) == (0.8, 0.2)
    assert cfg.max_positives is None and cfg.max_hard_negatives == 4
    assert cfg.report_thresholds == [0.25, 0.5, 0.75]
    assert mode_config_from_dict(NightlyConfig, {"top_k": "none"}).top_k is None
    with pytest.raises(ConfigError, match="`top_k` in config is 'ten'; use a number"):
        mode_config_from_dict(NightlyConfig, {"top_k": "ten"})
    with pytest.raises(ConfigError, match="`margin` in config cannot be none"):
        mode_config_from_dict(LabelConfig, {"margin": None})


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (NightlyConfig, {"top_k": 0}, "`top_k` is 0"),
        (NightlyConfig, {"top_k": 5, "overlap_k": 10}, "larger than `top_k`"),
        (NightlyConfig, {"first_stage": "bm25"}, "choose one of auto"),
        (LabelConfig, {"pos_threshold": 0.3, "neg_threshold": 0.3}, "must be below"),
        (LabelConfig, {"pos_threshold": 3.0, "neg_threshold": -1.0}, "score_norm lies in 0..1"),
        (LabelConfig, {"hard_negative_min_rank": 50, "hard_negative_max_rank": 10}, "window"),
        (LabelConfig, {"margin": -0.1}, "`margin` is -0.1"),
        (LabelConfig, {"label_source": "qrels"}, "choose one of threshold, given"),
        (LabelConfig, {"report_thresholds": []}, "`report_thresholds` is empty"),
        (
            LabelConfig,
            {"relative_margin": 1.0},
            r"`relative_margin` is 1.0; use a value in \[0, 1\)",
        ),
        (LabelConfig, {"hard_negative_format": "quad"}, "choose one of triplet, n-tuple"),
    ],
)
def test_invalid_values_are_rejected_with_the_fix(cls, values, message):
    with pytest.raises(ConfigError, match=message):
        cls(**values)


def test_raw_logit_thresholds_and_given_labels_are_allowed():
    assert LabelConfig(score_column="score", pos_threshold=3.0, neg_threshold=-1.0).pos_threshold
    # Given labels ignore the thresholds, so their order does not matter.
    assert LabelConfig(label_source="given", pos_threshold=0.1, neg_threshold=0.9)


def test_overlap_k_defaults_and_configs_are_frozen():
    assert NightlyConfig(top_k=7).effective_overlap_k == 7
    assert NightlyConfig(top_k=None).effective_overlap_k == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        NightlyConfig().top_k = 3  # type: ignore[misc]


def test_flags_round_trip_through_argparse_and_leave_other_flags_alone():
    parser = argparse.ArgumentParser()
    add_mode_flags(parser, LabelConfig)
    args, rest = parser.parse_known_args(
        ["--pos-threshold", "0.9", "--input", "s3://b/p/", "--max-hard-negatives", "3"]
    )
    cfg = mode_config_from_args(LabelConfig, args)
    assert (cfg.pos_threshold, cfg.max_hard_negatives, cfg.neg_threshold) == (0.9, 3, 0.3)
    assert rest == ["--input", "s3://b/p/"]


def test_absolute_margin_is_sentence_transformers_name_for_margin():
    assert mode_config_from_dict(LabelConfig, {"absolute_margin": "0.25"}).margin == 0.25
    parser = argparse.ArgumentParser()
    add_mode_flags(parser, LabelConfig)
    args = parser.parse_args(["--absolute-margin", "0.2", "--relative-margin", "0.05"])
    cfg = mode_config_from_args(LabelConfig, args)
    assert (cfg.margin, cfg.relative_margin, cfg.max_score) == (0.2, 0.05, None)
