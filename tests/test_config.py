"""params.yaml: defaults, overrides, and one-line errors for bad values."""
from __future__ import annotations

import pytest

from pipeline.config import load_params
from pipeline.errors import ConfigError


def test_missing_file_means_defaults(tmp_path):
    project = load_params(tmp_path / "none.yaml")
    assert project.paths.data == "workspace/data" and project.encode.storage_dtype == "bfloat16"


def test_shipped_params_load():
    from tests.conftest import REPO

    project = load_params(REPO / "params.yaml")
    assert project.train["experiment"] == "demo" and project.paths.features.endswith("features")


@pytest.mark.parametrize("text, match", [
    ("encode: {storage_dtype: fp16}", "storage_dtype"),
    ("encode: {dtype: half}", "encode.dtype"),
    ("ingest: {min_seconds: 3s}", "min_seconds"),
    ("ingest: {max_silence: 2}", "max_silence"),
    ("paths: {dta: x}", "unknown setting"),
    ("colours: {}", "unknown section"),
    ("- a\n- b", "mapping"),
    ("train: [1, 2]", "mapping"),
    ("encode: {storage_dtype: [", "not valid YAML"),
])
def test_bad_values_are_one_line_errors(tmp_path, text, match):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=match) as info:
        load_params(path)
    assert "\n" not in str(info.value)


def test_model_paths_resolve_from_the_original_repo_in_a_queued_experiment(tmp_path, monkeypatch):
    """`dvc exp run --queue` runs stages in a temporary copy (.dvc/tmp/exps/...) with DVC_ROOT set to the
    original repository: relative model folders missing in the copy are read from there."""
    origin = tmp_path / "repo"
    (origin / "workspace/checkpoints/MERT").mkdir(parents=True)
    copy = origin / ".dvc/tmp/exps/tmpabc"
    (copy / "workspace/checkpoints/mHuBERT").mkdir(parents=True)  # present in the copy: kept
    (copy / "params.yaml").write_text("models: {mert: workspace/checkpoints/MERT, mhubert: workspace/checkpoints/mHuBERT,"
                                      " acestep: /elsewhere/ACE-Step}\n", encoding="utf-8")
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(origin))
    models = load_params("params.yaml").models
    assert models.mert == str(origin / "workspace/checkpoints/MERT")
    assert models.mhubert == "workspace/checkpoints/mHuBERT" and models.acestep == "/elsewhere/ACE-Step"
    assert models.lyric_vocab == "workspace/checkpoints/lyrics_vocab.json"  # nowhere: left for the clear error
    monkeypatch.delenv("DVC_ROOT")
    assert load_params("params.yaml").models.mert == "workspace/checkpoints/MERT"
