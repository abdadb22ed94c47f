"""The model folder (models/folder.py): strict reading, and folders of earlier versions."""

import jax
import numpy as np
import pytest

from onestory_jax.checkpoint import save_model
from onestory_jax.config_files import load_config
from onestory_jax.errors import UserError
from onestory_jax.models.dit import init_fn
from onestory_jax.models.folder import check_folder, folder_config, read_onestory
from onestory_jax.sharding import init_sharded, make_mesh


def test_an_earlier_versions_dit_folder_still_loads(tmp_path):
    """convert --component dit --out M/dit wrote a bare DiT tree: read as onestory/ without memory."""
    cfg = load_config("tiny")
    mesh = make_mesh(cfg.mesh)
    dit = init_sharded(init_fn(cfg.dit, cfg.dit_runtime), mesh, jax.random.key(0))
    save_model(tmp_path / "dit", dit, cfg)
    assert folder_config(tmp_path).dit == cfg.dit
    _, params = read_onestory(tmp_path, cfg, mesh)
    assert set(params) == {"dit"}
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params["dit"]), jax.tree.leaves(dit)))


def test_what_is_not_a_model_folder_is_one_line(tmp_path):
    cfg = load_config("tiny")
    save_model(tmp_path / "ckpt", {"w": np.zeros(2, np.float32)}, cfg)
    cases = {
        tmp_path / "nowhere": "does not exist",
        tmp_path / "ckpt": "a single checkpoint, not a model folder",
        tmp_path: "holds ckpt/, not a part",
    }
    for path, message in cases.items():
        with pytest.raises(UserError, match=message) as e:
            check_folder(path)
        assert "\n" not in str(e.value)
