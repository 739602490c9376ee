"""Block sparsity (``block: RxC``) for magnitude, Wanda and SparseGPT: the mask is constant on every tile, the
counts are exact, 1x1 is the unstructured pruner bit for bit, magnitude and Wanda equal a plain loop written
from the definition, SparseGPT's blocked mask reconstructs better than magnitude's, and bad values are refused."""

from __future__ import annotations

import pytest
import torch

from strataprune.contract.errors import ConfigError
from strataprune.contract.layout import MatrixInfo, MatrixStats
from strataprune.contract.sparsity import BlockShape, Target, block_violations
from strataprune.engine.quantization import check_grid
from strataprune.plugins.common.masks import keep_for_target, split_evenly
from strataprune.plugins.common.scores import wanda_scores
from strataprune.plugins.pruners.magnitude import Magnitude
from strataprune.plugins.pruners.sparsegpt import SparseGPT
from strataprune.plugins.pruners.wanda import Wanda
from strataprune.testing import check_pruner

NAME = "model.layers.2.mlp.up_proj"
BLOCKS = ["4x1", "1x4", "2x2", "16x1", "1x16", "8x2"]
PRUNERS = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}


def problem(rows: int = 32, cols: int = 96, tokens: int = 768, seed: int = 0):
    """A weight, and calibration inputs with correlated channels of different scales (as activations have)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.7 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = mix @ (torch.randn(cols, tokens, generator=g) * (torch.rand(cols, 1, generator=g) * 3 + 0.2))
    weight = torch.randn(rows, cols, generator=g)
    info = MatrixInfo(NAME, 2, "mlp.up_proj", (rows, cols))
    stats = MatrixStats(info, tokens, input_norms=x.norm(dim=1), hessian=2 * x @ x.T / tokens)
    return weight, x, stats


def pruned(kind: str, block: str, weight, ratio, stats, **params):
    return PRUNERS[kind].from_params({"block": block, **params}).prune(weight, Target.of(ratio), stats)


def tile_counts(keep: torch.Tensor, block: BlockShape) -> torch.Tensor:
    rows, cols = keep.shape
    return keep.reshape(rows // block.rows, block.rows, cols // block.cols, block.cols).sum(dim=(1, 3))


# --------------------------------------------------------------------------- the references: plain loops
def reference_tile_scores(scores: list[list[float]], r: int, c: int) -> list[list[float]]:
    """Each r x c tile's score: the sum of its members, added one by one."""
    rows, cols = len(scores), len(scores[0])
    out = []
    for ti in range(rows // r):
        line = []
        for tj in range(cols // c):
            total = 0.0
            for i in range(ti * r, ti * r + r):
                for j in range(tj * c, tj * c + c):
                    total += scores[i][j]
            line.append(total)
        out.append(line)
    return out


def reference_keep(scores: torch.Tensor, block: str, ratio: float, group: str) -> torch.Tensor:
    """Keep whole tiles: sum the members' scores, then prune the lowest tiles of each comparison group
    (the whole matrix, or each row of tiles = R output rows), ties by position; the number pruned is
    floor(tiles * ratio) for the matrix, split over the row groups as evenly as possible (the first groups
    in each stretch get the remainder, exactly floor((g+1)K/G) - floor(gK/G))."""
    r, c = (int(v) for v in block.split("x"))
    tiles = reference_tile_scores(scores.double().tolist(), r, c)
    n_rows, n_cols = len(tiles), len(tiles[0])
    total = int(n_rows * n_cols * ratio)
    prune_tile = [[False] * n_cols for _ in range(n_rows)]
    if group == "matrix":
        order = sorted(((tiles[i][j], i * n_cols + j) for i in range(n_rows) for j in range(n_cols)))
        for _, pos in order[:total]:
            prune_tile[pos // n_cols][pos % n_cols] = True
    else:
        for i in range(n_rows):
            share = (i + 1) * total // n_rows - i * total // n_rows
            order = sorted((tiles[i][j], j) for j in range(n_cols))
            for _, j in order[:share]:
                prune_tile[i][j] = True
    keep = torch.ones(scores.shape, dtype=torch.bool)
    for i in range(n_rows):
        for j in range(n_cols):
            if prune_tile[i][j]:
                keep[i * r : i * r + r, j * c : j * c + c] = False
    return keep


@pytest.mark.parametrize("block", ["4x1", "1x4", "2x2", "1x16"])
@pytest.mark.parametrize("seed", [1, 2])
def test_magnitude_and_wanda_equal_a_plain_loop(block, seed):
    weight, _, stats = problem(rows=16, cols=32, seed=seed)
    for ratio in (0.3, 0.7):
        mag = pruned("magnitude", block, weight, ratio, stats).keep
        assert torch.equal(mag, reference_keep(weight.abs(), block, ratio, "matrix"))
        mag_row = pruned("magnitude", block, weight, ratio, stats, group="row").keep
        assert torch.equal(mag_row, reference_keep(weight.abs(), block, ratio, "row"))
        wanda = pruned("wanda", block, weight, ratio, stats).keep
        assert torch.equal(wanda, reference_keep(wanda_scores(weight, stats.input_norms), block, ratio, "row"))


# --------------------------------------------------------------------------- structure and counts
@pytest.mark.parametrize("kind", list(PRUNERS))
@pytest.mark.parametrize("block", BLOCKS)
def test_mask_is_constant_on_every_tile_and_the_count_is_exact(kind, block):
    weight, _, stats = problem()
    shape = BlockShape.parse(block, "test")
    tiles = (weight.shape[0] // shape.rows) * (weight.shape[1] // shape.cols)
    for ratio in (0.5, 0.7):
        result = pruned(kind, block, weight, ratio, stats)
        keep = result.keep
        assert block_violations(keep, shape) == 0
        counts = tile_counts(keep, shape)
        assert set(counts.unique().tolist()) <= {0, shape.size}
        # floor(tiles * s) of the matrix, for every pruner
        assert int((counts == 0).sum()) == int(tiles * ratio)
        if result.weight is not None:
            assert not bool((result.weight[~keep] != 0).any())
        if kind == "wanda":  # each group of R rows prunes its share: the shares differ by at most one tile
            per_group = (counts == 0).sum(dim=1)
            assert int(per_group.max() - per_group.min()) <= 1


def test_sparsegpt_splits_the_matrix_count_over_slabs_rounded_to_the_block():
    weight, _, stats = problem(rows=16, cols=96)
    result = SparseGPT.from_params({"block": "1x8", "blocksize": 20}).prune(weight, Target.of(0.65), stats)
    assert "blocksize 20 -> 16" in " ".join(result.notes)
    counts = tile_counts(result.keep, BlockShape(1, 8))  # (16, 12) tiles; slabs of 2 tile columns = 32 tiles
    per_slab = [int((counts[:, start : start + 2] == 0).sum()) for start in range(0, 12, 2)]
    # floor(32 t * 0.65) - floor(32 (t - 1) * 0.65): 20 or 21 (20.8 each), 124 = floor(192 * 0.65) in all
    assert per_slab == [int(32 * t * 0.65) - int(32 * (t - 1) * 0.65) for t in range(1, 7)]
    assert sum(per_slab) == int(192 * 0.65) and set(per_slab) == {20, 21}


def test_sparsegpt_large_tiles_keep_the_matrix_count_across_slabs():
    weight, _, stats = problem(rows=32, cols=320)  # slabs of 128, 128, 64 columns
    keep = pruned("sparsegpt", "16x16", weight, 0.7, stats).keep
    assert int((~keep).sum()) == 256 * int(2 * 20 * 0.7)


def test_wanda_row_groups_share_the_matrix_count_evenly():
    assert split_evenly(10, 4).tolist() == [2, 3, 2, 3]
    assert split_evenly(0, 3).tolist() == [0, 0, 0]
    assert int(split_evenly(58060, 144).sum()) == 58060
    weight, _, stats = problem(rows=32, cols=96)
    keep = pruned("wanda", "1x4", weight, 0.7, stats).keep  # 24 tiles per row: 16.8 each, 537 over 32 rows
    assert int((~keep).sum()) == 4 * int(32 * 24 * 0.7)


@pytest.mark.parametrize("kind", list(PRUNERS))
def test_1x1_is_the_unstructured_pruner_bit_for_bit(kind):
    weight, _, stats = problem()
    for ratio in (0.5, 0.7):
        default = PRUNERS[kind]().prune(weight, Target.of(ratio), stats)
        unit = pruned(kind, "1x1", weight, ratio, stats)
        assert torch.equal(default.keep, unit.keep)
        if kind == "sparsegpt":
            assert torch.equal(default.weight, unit.weight)
            assert default.extra["loss"] == unit.extra["loss"]
    scores = {"magnitude": weight.abs(), "wanda": wanda_scores(weight, stats.input_norms)}
    if kind in scores:  # the selection the pruners made before the option existed
        group = "matrix" if kind == "magnitude" else "row"
        assert torch.equal(pruned(kind, "1x1", weight, 0.7, stats).keep, keep_for_target(scores[kind], Target.of(0.7), group))


@pytest.mark.parametrize("block", ["4x1", "1x4"])
def test_contract_checks_pass_with_blocks(block):
    for kind in PRUNERS:
        instance = PRUNERS[kind].from_params({"block": block})
        assert not instance.supports_nm
        check_pruner(instance, ratios=(0.0, 0.5, 0.9))


# --------------------------------------------------------------------------- SparseGPT with blocks
def reconstruction_error(weight, sparse, x) -> float:
    return float((weight @ x - sparse @ x).norm())


@pytest.mark.parametrize("block", ["4x1", "1x4", "2x2"])
def test_sparsegpt_blocks_reconstruct_better_than_magnitude_blocks(block):
    weight, x, stats = problem(rows=32, cols=128, tokens=1024)
    sgpt = pruned("sparsegpt", block, weight, 0.7, stats)
    mag = pruned("magnitude", block, weight, 0.7, stats).keep
    e_sgpt, e_mag = reconstruction_error(weight, sgpt.weight, x), reconstruction_error(weight, weight * mag, x)
    print(f"\n{block}: sparsegpt {e_sgpt:.1f}  magnitude {e_mag:.1f}")
    assert e_sgpt < 0.95 * e_mag
    # the OBS update still helps with the blocked mask (only the mask changed)
    assert e_sgpt < reconstruction_error(weight, weight * sgpt.keep, x)
    # and the same block count as magnitude's, to the weight
    assert int(sgpt.keep.sum()) == int(mag.sum())


def test_sparsegpt_blocks_with_joint_int4():
    weight, _, stats = problem()
    result = pruned("sparsegpt", "4x1", weight, 0.7, stats, wbits=4, groupsize=32)
    assert block_violations(result.keep, BlockShape(4, 1)) == 0
    assert int((~result.keep).sum()) == 4 * int(8 * 96 * 0.7)
    assert check_grid(result.weight, result.extra["quant"], "test") < 1e-3  # every stored value on its grid
    assert not bool((result.weight[~result.keep] != 0).any())
    reference = SparseGPT.from_params({"block": "4x1", "wbits": 4, "groupsize": 32}).unquantized()
    assert reference.block_shape == BlockShape(4, 1)  # the sparse-only reference prunes the same pattern


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("value", ["3x1", "4x", "0x4", "17x1", "32x1", "4x1x1", "x4", "four", "", 4, 4.0, None, True, ["4", "1"]])
@pytest.mark.parametrize("kind", list(PRUNERS))
def test_bad_block_values_are_one_clear_config_error(kind, value):
    with pytest.raises(ConfigError) as info:
        PRUNERS[kind].from_params({"block": value})
    message = str(info.value)
    assert f"block={value!r}" in message and "1, 2, 4, 8, 16" in message and "'4x1'" in message
    assert "\n" not in message


def test_block_spellings_are_normalised():
    assert Wanda.from_params({"block": " 4X1 "}).params()["block"] == "4x1"
    assert Wanda().params()["block"] == "1x1"


@pytest.mark.parametrize("kind", list(PRUNERS))
def test_block_with_an_nm_target_is_refused(kind):
    weight, _, stats = problem()
    instance = PRUNERS[kind].from_params({"block": "1x4"})
    assert not instance.supports_nm
    assert "block=1x4" in instance.nm_refusal(Target.of(pattern="2:4").pattern)
    with pytest.raises(ConfigError, match="N:M"):
        instance.prune(weight, Target.of(pattern="2:4"), stats)
    assert PRUNERS[kind]().supports_nm  # 1x1 keeps N:M


@pytest.mark.parametrize("kind", list(PRUNERS))
def test_a_matrix_the_block_does_not_divide_is_refused_naming_it(kind):
    weight, _, stats = problem(rows=30, cols=96)
    instance = PRUNERS[kind].from_params({"block": "4x1"})
    with pytest.raises(ConfigError, match=rf"{NAME} has shape \(30, 96\)"):
        instance.prune(weight, Target.of(0.5), stats)
    info = MatrixInfo(NAME, 2, "mlp.up_proj", (30, 96))
    with pytest.raises(ConfigError, match=r"multiple of 4"):  # before any calibration: the host calls it once loaded
        instance.check_matrices([info])
    PRUNERS[kind].from_params({"block": "2x8"}).check_matrices([info])


def test_dsnot_refuses_a_blocked_base():
    from strataprune.plugins.pruners.dsnot import DSnoT

    with pytest.raises(ConfigError, match="block=4x1"):
        DSnoT.from_params({"base": "wanda", "base_params": {"block": "4x1"}})
    DSnoT.from_params({"base": "wanda", "base_params": {"block": "1x1"}})


def test_block_violations_counts_partly_kept_tiles():
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[0:4, 0] = False  # one whole 4x1 tile
    assert block_violations(keep, BlockShape(4, 1)) == 0
    keep[5, 3] = False
    assert block_violations(keep, BlockShape(4, 1)) == 1
    assert block_violations(keep, BlockShape(1, 4)) == 5  # the tiles (r, 0:4) of rows 0..3, and (5, 0:4)


# --------------------------------------------------------------------------- through the host
def test_tiny_llama_run_saves_block_sparse_weights(tiny_llama_dir, text_file, tmp_path):
    import json

    from safetensors.torch import load_file

    from strataprune.cli import main

    out = tmp_path / "out"
    args = ["run", "--model", str(tiny_llama_dir), "--calibration", str(text_file), "--eval-data", str(text_file)]
    args += ["--nsamples", "2", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "1", "--output", str(out)]
    assert main([*args, "--quiet", "--pruner", "sparsegpt", "--set", "pruner.block=4x1", "--sparsity", "0.6"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["plugin_params"]["pruner"]["block"] == "4x1"
    assert report["sparsity"]["realised_prunable"] == pytest.approx(0.6, abs=1e-3)
    weights = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items() if k.endswith("proj.weight")}
    assert weights
    for name, weight in weights.items():
        assert block_violations(weight != 0, BlockShape(4, 1)) == 0, name


def test_the_host_refuses_a_mask_that_breaks_the_blocks_it_claims():
    from strataprune.contract.errors import PluginError
    from strataprune.contract.layout import BlockStats
    from strataprune.engine.pruning import PruneRecord, prune_matrix

    class Liar(Magnitude):
        def prune(self, weight, target, stats):
            result = super().prune(weight, target, stats)
            keep = result.keep.clone()
            first_pruned = torch.nonzero(~keep)[0]
            first_kept = torch.nonzero(keep)[0]
            keep[tuple(first_pruned)], keep[tuple(first_kept)] = True, False  # same count, tiles broken
            return type(result)(keep=keep)

    weight, _, stats = problem()
    block_stats = BlockStats(block=2, matrices=[stats.info], weights={NAME: weight}, ntokens=768)

    class Adapter:
        def set_weight(self, module, new):
            raise AssertionError("a refused mask must not be written")

    allocation = type("A", (), {"patterns": {}, "ratios": {NAME: 0.5}})()
    with pytest.raises(PluginError, match="tiles of 4x1 are partly kept"):
        prune_matrix(Liar.from_params({"block": "4x1"}), Adapter(), None, stats.info, block_stats, allocation, PruneRecord())
