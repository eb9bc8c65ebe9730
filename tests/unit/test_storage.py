import pytest

from rerank_ray.storage import ModelLoadError, S3Settings, describe_error, resolve, resolve_model


def test_only_pickle_weights_refused_unless_allowed(model_copy):
    st = model_copy / "model.safetensors"
    st.rename(model_copy / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="--allow-pickle-weights"):
        resolve_model(str(model_copy), s3=S3Settings())
    assert resolve_model(str(model_copy), s3=S3Settings(), allow_pickle_weights=True) == model_copy


def test_directory_without_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weight files"):
        resolve_model(str(model_copy), s3=S3Settings())


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "nope" / "model"), s3=S3Settings())


def test_resolve_uris(tmp_path):
    fs, path = resolve(str(tmp_path / "x"), S3Settings())
    assert path == str(tmp_path / "x")
    fs, path = resolve("s3://bucket/a/b/", S3Settings(endpoint_url="http://127.0.0.1:9"))
    assert path == "bucket/a/b"
    with pytest.raises(Exception, match="Unsupported URI scheme"):
        resolve("gs://bucket/x", S3Settings())


def test_endpoint_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1234")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert S3Settings.resolve(None, None, True).endpoint_url == "http://127.0.0.1:1234"
    assert S3Settings.resolve("http://h:1", None, True).endpoint_url == "http://h:1"


def test_error_descriptions_give_the_fix():
    assert "bucket does not exist" in describe_error(OSError("NoSuchBucket: x"))
    assert "credentials" in describe_error(OSError("AWS Error ACCESS_DENIED"))


def test_background_work_returns_its_value_or_raises_its_error():
    from rerank_ray.pipeline import _in_thread

    assert _in_thread(lambda a, b: a + b, 2, 3)() == 5

    def fails():
        raise FileNotFoundError("weights gone")

    with pytest.raises(FileNotFoundError, match="weights gone"):
        _in_thread(fails)()


def test_sink_sends_no_driver_callback_to_write_tasks(tmp_path):
    import pickle
    import threading

    from rerank_ray.sink import OutputLocation, RerankSink

    lock = threading.Lock()  # unpicklable, like a thread's handle
    out = RerankSink(
        OutputLocation(str(tmp_path), S3Settings(), "r1"),
        run_date="2026-11-22",
        partition_by=["run_date"],
        expected_rows=0,
        manifest_extra={},
        late_manifest_extra=lambda: {"held": lock.locked()},
    )
    copy = pickle.loads(pickle.dumps(out))
    assert copy._late_manifest_extra is None and out._late_manifest_extra is not None
    manifest = out.commit([])
    assert manifest["held"] is False and manifest["rows_read"] == 0
