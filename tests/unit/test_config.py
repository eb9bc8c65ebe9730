import pytest

from rerank_ray.cli import build_parser, config_from_args
from rerank_ray.config import ConfigError, JobConfig

BASE = {"input": "s3://b/in/", "output": "s3://b/out/"}


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match="Did you mean `max_length`"):
        JobConfig.from_dict({**BASE, "max_lenght": 256})


def test_defaults_follow_flagreranker():
    cfg = JobConfig(**BASE)
    assert cfg.max_length == 512
    assert cfg.effective_query_max_length == 512 * 3 // 4
    assert cfg.partition_by == ["run_date"]
    assert cfg.trust_remote_code is False and cfg.allow_pickle_weights is False
    assert cfg.fused_kernels is True and cfg.fast_gelu is False


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"dtype": "fp8"}, "dtype"),
        ({"max_length": 4}, "max_length"),
        ({"query_max_length": 600}, "query_max_length"),
        ({"num_actors": 2, "min_actors": 1, "max_actors": 3}, "either"),
        ({"min_actors": 1}, "go together"),
        ({"min_actors": 4, "max_actors": 2}, "larger"),
        ({"token_budget": 100}, "token_budget"),
        ({"run_date": "21/11/2026"}, "YYYY-MM-DD"),
        ({"run_id": "../escape"}, "run_id"),
        ({"query_column": "doc"}, "must differ"),
        ({"scorer_calls": 0}, "scorer_calls"),
    ],
)
def test_invalid_values_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig.from_dict({**BASE, **bad})


def test_missing_input_is_an_error():
    with pytest.raises(ConfigError, match="`input` is required"):
        JobConfig.from_dict({"output": "x"})


def test_yaml_with_flag_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "input: s3://b/in/\noutput: s3://b/out/\nmax-length: 256\n"
        "partition_by: [run_date, lang]\ns3_verify_tls: false\n"
    )
    cfg = JobConfig.from_yaml(path, {"max_length": "128"})
    assert cfg.max_length == 128
    assert cfg.partition_by == ["run_date", "lang"]
    assert cfg.s3_verify_tls is False


def test_yaml_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: a\noutput: b\nbatch_row: 5\n")
    with pytest.raises(ConfigError, match=r"job\.yaml.*batch_rows"):
        JobConfig.from_yaml(path)


def test_flags_build_the_same_config():
    args = build_parser().parse_args(
        [
            "run",
            "--input",
            "in",
            "--output",
            "out",
            "--max-length",
            "128",
            "--partition-by",
            "run_date,lang",
            "--no-s3-verify-tls",
            "--allow-pickle-weights",
            "--no-fused-kernels",
        ]
    )
    cfg = config_from_args(args)
    assert cfg == JobConfig(
        input="in",
        output="out",
        max_length=128,
        partition_by=["run_date", "lang"],
        s3_verify_tls=False,
        allow_pickle_weights=True,
        fused_kernels=False,
    )


def test_resolved_defaults_are_fixed_once():
    cfg = JobConfig(**BASE).with_defaults_resolved()
    assert cfg.run_id and cfg.run_date
    assert cfg.with_defaults_resolved() == cfg


def test_tokenize_actors_must_be_positive():
    with pytest.raises(ConfigError, match="tokenize_actors"):
        JobConfig.from_dict({**BASE, "tokenize_actors": 0})


def test_a_count_below_one_is_an_error_naming_the_field_and_its_value():
    with pytest.raises(ConfigError, match=r"`batch_rows` is 0.*--batch-rows"):
        JobConfig(input="a", output="b", batch_rows=0)
    with pytest.raises(ConfigError, match=r"`scorer_calls` is -1"):
        JobConfig(input="a", output="b", scorer_calls=-1)
