"""The fpga.hls export and `edgekit fpga csim` end to end: recipe -> trained detector -> HLS project -> bit-exact csim."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytest.importorskip("hls4ml")
if shutil.which("g++") is None and not os.environ.get("EDGEKIT_REQUIRE_SYSTEM_TOOLS"):  # .ci/system-packages.sh installs it
    pytest.skip("g++ is not installed", allow_module_level=True)

RECIPE = """
name: fpga_micro
seed: 0
model:
  source: python:tests.factories:codenet_micro
  trust_python: true
  args: {{variant: {variant}}}
  inputs: [{{name: image, shape: [batch, 3, 32, 32], dtype: float32, layout: NCHW, low: 0, high: 1}}]
  dims: {{batch: 1}}
compress:
  - train.centernet: {{images: 32, steps: 4, batch_size: 8, eval_images: 8}}
export:
  - fpga.hls: {{board: {board}, clock_mhz: 150, calibration_images: 8, csim_images: 3, eval_images: 8, sanitize: false{extra}}}
report: {{formats: [json, md]}}
"""


def compress(tmp_path: Path, variant: str = "dcn_dw_square_int", board: str = "zcu104", extra: str = "") -> tuple[int, Path]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(variant=variant, board=board, extra=extra))
    run_dir = tmp_path / "run"
    return run_cli(["compress", str(recipe), "--run-dir", str(run_dir), "--quiet"]), run_dir


@pytest.mark.slow
def test_recipe_writes_a_project_that_csim_proves_bit_exact(tmp_path, capsys):
    code, run_dir = compress(tmp_path)
    assert code == 0, capsys.readouterr().err
    step = next((run_dir / "steps").glob("*fpga.hls"))
    manifest = json.loads((step / "manifest.json").read_text())
    fpga = manifest["metrics"]["fpga"]
    assert manifest["format"] == "fpga"
    assert fpga["csim"]["images"] == 3 and fpga["csim"]["mismatches"] == 0
    assert fpga["csim"]["values"] == 3 * 7 * 8 * 8  # heatmap 3 + size 2 + offset 2 channels at stride 4
    assert 0 <= fpga["ap50_w4a8"] <= 1 and fpga["estimate"]["fits"]
    report = (run_dir / "report.md").read_text()
    assert "## FPGA" in report and "every value equal to the integer reference" in report and "AP50: float" in report
    project = step / "artifact" / "hls"
    tcl = (project / "build_prj.tcl").read_text()
    assert "xczu7ev-ffvc1156-2-e" in tcl and "6.66" in tcl  # zcu104's part, 150 MHz
    assert any("deform" in p.name for p in (project / "firmware" / "weights").iterdir())

    capsys.readouterr()
    assert run_cli(["fpga", "csim", str(run_dir), "--no-sanitize", "--images", "2"]) == 0
    assert "all bit-exact" in capsys.readouterr().out

    # A generated bias changed by hand: the testbench must see it and the command must fail.
    header = project / "firmware" / "weights" / "heatmap_out.h"
    text = header.read_text()
    start = text.index("b_heatmap_out[3] = {") + len("b_heatmap_out[3] = {")
    end = text.index(",", start)
    header.write_text(text[:start] + str(int(text[start:end]) + 1) + text[end:])
    assert run_cli(["fpga", "csim", str(run_dir), "--no-sanitize", "--images", "2"]) == 1
    assert "differs from the integer reference" in capsys.readouterr().err


def test_design_too_big_for_the_board_is_a_clear_error(tmp_path, capsys):
    code, run_dir = compress(tmp_path, board="pynq-z2", extra=", parallelism: 64")
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: the design needs") and "pynq-z2" in err and "Traceback" not in err
    assert not list((run_dir / "steps").glob("*fpga.hls"))  # nothing half-written


def test_float_only_variant_is_refused_by_name(tmp_path, capsys):
    code, _ = compress(tmp_path, variant="dcn_dw_bound")
    err = capsys.readouterr().err
    assert code == 2 and "dcn_dw_bound" in err and "dcn_dw_square_int" in err


def test_unknown_board_and_missing_run_are_user_errors(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(variant="conv3x3", board="ultra69", extra=""))
    assert run_cli(["compress", str(recipe), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    assert "ultra96v2" in capsys.readouterr().err
    assert run_cli(["fpga", "csim", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty" / "steps").mkdir(parents=True)
    assert run_cli(["fpga", "csim", str(tmp_path / "empty")]) == 2
    assert "no finished fpga.hls step" in capsys.readouterr().err
