"""Model profile: parameters and multiply-adds against the official (fvcore) numbers."""

from __future__ import annotations

import json

import pytest

from unetrpp import create_model
from unetrpp.cli.main import main
from unetrpp.network.analysis import count_macs

# fvcore multiply-adds of the official network, eval mode, deep supervision on (spec section 2.1)
OFFICIAL_MACS = {"synapse": 47.886e9, "acdc": 43.633e9}


@pytest.mark.parametrize("name", sorted(OFFICIAL_MACS))
def test_macs_match_the_official_count(name):
    total, by_kind, by_group = count_macs(create_model(name))
    assert abs(total / OFFICIAL_MACS[name] - 1) < 0.01
    assert sum(by_group.values()) == total
    assert by_kind["conv"] > by_kind["matmul/linear"] > by_kind["norm"] > 0


def test_synapse_paper_figure_and_stage_split():
    total, _, groups = count_macs(create_model("synapse"))
    assert abs(total / 47.89e9 - 1) < 0.01  # the acceptance figure
    # spec 2.1, by module: encoder 12.68, encoder1 7.92, decoder5/4/3 1.59/3.29/6.99, decoder2 15.17 G
    encoder = sum(v for k, v in groups.items() if k.startswith(("stages", "downsample")))
    for got, want in [(encoder, 12.68e9), (groups["stem_block"], 7.92e9), (groups["decoder.0"], 1.59e9),
                      (groups["decoder.1"], 3.29e9), (groups["decoder.2"], 6.99e9), (groups["final"], 15.17e9)]:
        assert abs(got / want - 1) < 0.01


def test_info_cli_json(capsys):
    assert main(["info", "acdc", "--patch-size", "16", "96", "96", "--no-memory", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["img_size"] == [16, 96, 96]
    assert [s["tokens"] for s in out["stages"] if s["name"].startswith("stages.")] == [9216, 1152, 144, 18]
    assert out["flops"] == 2 * out["macs"]


def test_info_cli_table_and_memory(capsys):
    assert main(["info", "synapse", "--patch-size", "32", "64", "64"]) == 0
    out = capsys.readouterr().out
    assert "multiply-adds:" in out and "G MACs" in out and "FLOPs:" in out
    assert "activations kept for backward (training, batch 1):" in out
    assert "32x16x16" not in out and "16x16x16" in out  # stage 1 of a (32, 64, 64) patch
