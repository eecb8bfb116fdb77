"""The launch table: per-architecture first choices and the measured table `make tune` writes."""

import json

import pytest

from ckpt_attn.kernels import launch_config
from ckpt_attn.kernels.launch_config import LaunchConfig


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_config, "TUNED_DIR", tmp_path)
    launch_config.tuned_table.cache_clear()
    yield tmp_path
    launch_config.tuned_table.cache_clear()


def test_hopper_and_ampere_tables_differ_where_codegen_chose(tuned_dir):
    hopper = launch_config.candidates("fwd", 90, 128, element_size=2)
    ampere = launch_config.candidates("fwd", 80, 128, element_size=2)
    assert hopper[0] == LaunchConfig(128, 128, 8, 2)
    assert ampere[0] == LaunchConfig(128, 64, 8, 3)


def test_tuned_config_goes_first_for_16_bit_inputs(tuned_dir):
    (tuned_dir / "sm_90.json").write_text(json.dumps({"best": {"dq": {"64": [64, 32, 4, 2]}}}))
    tuned = LaunchConfig(64, 32, 4, 2)
    configs = launch_config.candidates("dq", 90, 64, element_size=2)
    assert configs[0] == tuned
    assert configs[1:] == [c for c in launch_config._HOPPER["dq"][64] if c != tuned]
    # other kernels, head dims and architectures keep the table
    assert launch_config.candidates("dq", 90, 128, 2) == launch_config._HOPPER["dq"][128]
    assert launch_config.candidates("dq", 80, 64, 2) == launch_config._AMPERE["dq"][64]
    # fp32 tiles are the table's, halved (the tuned one was measured on bf16)
    assert launch_config.candidates("dq", 90, 64, 4) == [
        launch_config._shrink_for_fp32(c) for c in launch_config._HOPPER["dq"][64]]


def test_masked_kernels_skip_the_largest_tiles(tuned_dir):
    plain = launch_config.candidates("fwd", 90, 128, 2)
    masked = launch_config.candidates("fwd", 90, 128, 2, masked=True)
    assert plain[0] == LaunchConfig(128, 128, 8, 2)
    assert masked == [c for c in plain if c.block_m * c.block_n <= 128 * 64]
    assert all(launch_config.candidates(k, arch, d, 2, masked=True)
               for k in launch_config.KERNELS for arch in (80, 90) for d in (16, 32, 64, 128, 256))
