"""asyncdni.api: keyword configuration and one real run through the workers."""
from __future__ import annotations

import pytest

from asyncdni import api
from asyncdni import config as C


def test_keywords_name_fields():
    cfg = api.configure(lr=0.01, schedule="backprop", steps=7, fields={"model.width": 32})
    assert (cfg.train.lr, cfg.train.schedule, cfg.train.steps, cfg.model.width) == (0.01, "backprop", 7, 32)
    assert api.field_of("data_path") == "data.path" and api.field_of("train.seed") == "train.seed"


def test_a_data_path_names_its_kind_by_suffix():
    """As on the command line: an .npz, .npy or .csv path is that format, anything else IDX."""
    assert api.configure(data_path="d/x.npz").data.dataset == "npz"
    assert api.configure(data_path="d/table.CSV").data.dataset == "csv"
    assert api.configure(data_path="../shared/data/mnist").data.dataset == "idx"


def test_ambiguous_or_unknown_keywords_are_one_clear_error():
    with pytest.raises(C.ConfigError, match="seed: several fields"):
        api.configure(seed=1)
    with pytest.raises(C.ConfigError, match="lr_max: no configuration field"):
        api.configure(lr_max=1)
    with pytest.raises(C.ConfigError, match="train.lr"):
        api.configure(lr=-1)


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_leftover_processes")
def test_train_runs_the_workers():
    result = api.train(steps=60, schedule="sequential", layers=3, width=32)
    assert result.plan.n_layers == 3 and result.feeder["samples"] == 60 * result.plan.batch_size
    line = api.summary_line(result)
    assert line.startswith("sequential: numpy mlp, 3 layers, 60 steps, test bit accuracy ")
