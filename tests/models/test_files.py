"""Model folders: a packed strataprune checkpoint is refused as a transformers model, naming the way out."""

from __future__ import annotations

import pytest
import torch
from support import save_tiny_model

from strataprune.contract.errors import DataError
from strataprune.models.files import check_model_folder


@pytest.mark.parametrize("manifest", ["strataprune.json", "sparse_cpu.json"])
def test_a_packed_folder_is_refused_instead_of_loading_random_weights(tmp_path, manifest):
    from strataprune.deploy import format as spformat
    from strataprune.deploy.rundir import load_causal_lm

    folder = save_tiny_model("llama", tmp_path / "m")
    assert check_model_folder(folder, str(folder))["model_type"] == "llama"  # a plain folder passes
    model = load_causal_lm(folder)
    if manifest == "strataprune.json":
        spformat.write_folder(model, tmp_path / "packed", pack_linears=True)
    else:
        from strataprune import kernels
        from strataprune.kernels import sparsify_model

        if not kernels.available():
            pytest.skip(f"kernels not built: {kernels.available().reason}")

        sparsify_model(model, min_sparsity=0.0)
        spformat.write_legacy_sparse_cpu(model, tmp_path / "packed")
    with pytest.raises(DataError, match=f"packed strataprune checkpoint \\({manifest}.*strataprune export"):
        check_model_folder(tmp_path / "packed", "packed")
    assert torch.equal(load_causal_lm(tmp_path / "packed").model.norm.weight, model.model.norm.weight)  # strataprune reads it
