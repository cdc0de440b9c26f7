"""The ``fpga.hls`` export pass: a torch detector to a Vitis HLS project.

Quantizes to W4A8 (4-bit per-channel weights, 8-bit activations), lowers to
the integer IR, estimates resources and FPS on the board, writes the HLS
project, and - unless ``csim_images: 0`` - proves it with a g++ C-simulation
that compares every output value with the Python integer reference. The
output artifact (format ``fpga``) is a folder with ``graph/`` (the IR) and
``hls/`` (the project: firmware, testbench, ``build_prj.tcl``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from edgekit.artifact import Artifact
from edgekit.errors import StepFailed, UserError
from edgekit.passes import Pass, PassConfig, PassContext

GRAPH_DIR, PROJECT_DIR = "graph", "hls"  # inside the artifact folder: the IR and the HLS project
CALIBRATION_SEED_OFFSET = 20_000  # scenes for calibration and csim differ from the training scenes
CSIM_SEED_OFFSET = 30_000


class HlsConfig(PassConfig):
    board: str = Field("ultra96v2", description="board preset: ultra96v2, pynq-z2, zcu104")
    clock_mhz: float | None = Field(None, gt=0, le=1000, description="target clock (default: the board's)")
    top: str = Field("edgekit_top", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="name of the HLS top function")
    calibration_images: int = Field(64, ge=1, description="images for activation ranges")
    calibration: Literal["max", "percentile"] = "max"
    csim_images: int = Field(20, ge=0, description="images the g++ C-simulation checks bit-exactly against the reference (0: skip)")
    sanitize: bool = Field(True, description="build the C-simulation with -fsanitize=address,undefined")
    eval_images: int = Field(200, ge=0, description="held-out scenes for AP50 of the float and W4A8 models (detectors only; 0: skip)")
    parallelism: int | dict[str, int] | None = Field(
        None, description="MACs per cycle of every layer, or per IR layer name (default: chosen to fit the board)"
    )

    @field_validator("board")
    @classmethod
    def _known_board(cls, v: str) -> str:
        from edgekit.fpga.boards import get_board

        get_board(v)
        return v


class ExportHls(Pass):
    """Quantize to W4A8, lower to the integer IR, write a Vitis HLS project and check it by C-simulation."""

    name = "fpga.hls"
    kind = "export"
    Config = HlsConfig
    accepts = ("torch",)
    produces = "fpga"

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from edgekit.compress.train_detection import EVAL_SEED_OFFSET, image_size_of
        from edgekit.fpga.boards import get_board
        from edgekit.fpga.estimate import estimate
        from edgekit.fpga.hls import write_project
        from edgekit.fpga.lower import lower
        from edgekit.fpga.quantize import calibrate, fake_quant_model

        cfg: HlsConfig = self.config
        board = get_board(cfg.board)
        clock = cfg.clock_mhz or board.clock_mhz
        size = image_size_of(artifact)
        model = artifact.torch_module()
        started = time.perf_counter()
        images = calibration_images(ctx, cfg.calibration_images, size)
        qparams = calibrate(model, images, method=cfg.calibration)
        graph = lower(model, qparams, size)
        graph.meta.update(board=board.name, clock_mhz=clock, seed=ctx.seed)
        est = estimate(graph, board.name, clock, cfg.parallelism)  # a clear error when the design does not fit
        graph.save(ctx.workdir / GRAPH_DIR)
        project = write_project(graph, ctx.workdir / PROJECT_DIR, board.name, clock, top=cfg.top, parallelism=cfg.parallelism)
        metrics: dict = {
            "board": board.name,
            "clock_mhz": clock,
            "layers": len(graph.layers),
            "estimate": est.summary(),
            "seconds": round(time.perf_counter() - started, 2),
        }
        if cfg.eval_images and artifact.task == "detection":
            from edgekit.models.centernet import evaluate_ap50
            from edgekit.models.shapes_detection import make_dataset

            scenes = make_dataset(cfg.eval_images, ctx.seed + EVAL_SEED_OFFSET, size)
            metrics["ap50_float"] = round(evaluate_ap50(model, scenes), 4)
            metrics["ap50_w4a8"] = round(evaluate_ap50(fake_quant_model(qparams), scenes), 4)
            ctx.log(f"  AP50 float {metrics['ap50_float']:.3f}, W4A8 {metrics['ap50_w4a8']:.3f} ({cfg.eval_images} scenes)")
        if cfg.csim_images:
            metrics["csim"] = run_checked_csim(project, graph, csim_images(ctx.seed, cfg.csim_images, size), cfg.sanitize, ctx.log)
        ctx.metrics["fpga"] = metrics
        return Artifact(
            format="fpga",
            inputs=[s.model_copy() for s in artifact.inputs],
            outputs=list(graph.outputs),
            task=artifact.task,
            lineage=list(artifact.lineage),
            files={"weights": f"{GRAPH_DIR}/weights.npz"},  # the size the report shows: the integer weights
            folder=ctx.workdir,
            meta={**artifact.meta, "board": board.name, "clock_mhz": clock, "top": cfg.top},
        )


def calibration_images(ctx: PassContext, n: int, size: int):
    """The recipe's calibration split if it has images, else generated shapes scenes."""
    import numpy as np
    import torch

    if ctx.data is not None and ctx.data.has_split("calibration"):
        feeds = ctx.samples(n) if ctx.samples else []
        arrays = [next(iter(f.values())) for f in feeds]
        if arrays and arrays[0].ndim == 4 and arrays[0].shape[1:] == (3, size, size):
            return torch.from_numpy(np.concatenate(arrays).astype(np.float32))
    from edgekit.models.shapes_detection import make_dataset

    return make_dataset(n, ctx.seed + CALIBRATION_SEED_OFFSET, size).tensor()


def csim_images(seed: int, n: int, size: int):
    """uint8 CHW images for the C-simulation (generated scenes, deterministic from the seed)."""
    from edgekit.models.shapes_detection import make_dataset

    return list(make_dataset(n, seed + CSIM_SEED_OFFSET, size).images.transpose(0, 3, 1, 2))


def run_checked_csim(project, graph, images, sanitize: bool, log) -> dict:
    """Run the C-simulation; a mismatch is a failed export, not a warning."""
    from edgekit.fpga.csim import run_csim

    log(f"  C-simulation of {len(images)} images with g++{' (ASan/UBSan)' if sanitize else ''}")
    result = run_csim(project, graph, images, sanitize=sanitize)
    summary = result.summary()
    if result.mismatches:
        raise StepFailed(
            f"fpga.hls: the generated C++ differs from the integer reference in {result.mismatches} of {result.values} values; "
            f"this is a bug in edgekit's HLS generator, please report it with {project}"
        )
    log(f"  C-simulation: {result.values} values on {result.images} images, all bit-exact")
    return summary


def find_fpga_steps(run_dir: Path) -> list[Path]:
    """Step folders of fpga.hls in a run folder (or the step folder itself)."""
    import json

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; give the run folder of a recipe with an fpga.hls export (e.g. runs/NAME)")
    candidates = [run_dir] if (run_dir / "manifest.json").is_file() else sorted((run_dir / "steps").glob("*"))
    steps = []
    for folder in candidates:
        manifest = folder / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("pass") == ExportHls.name:
            steps.append(folder)
    if not steps:
        raise UserError(f"{run_dir} has no finished fpga.hls step; run a recipe with `export: - fpga.hls: {{board: ultra96v2}}` first")
    return steps


def csim_run_dir(run_dir: Path, images: int | None, sanitize: bool, log) -> list[dict]:
    """``edgekit fpga csim``: re-run the C-simulation of every fpga.hls step of a run."""
    import json

    from edgekit.fpga.ir import Graph

    results = []
    for step in find_fpga_steps(run_dir):
        manifest = json.loads((step / "manifest.json").read_text())
        artifact = Artifact.load(step / "artifact")
        graph = Graph.load(artifact.folder / GRAPH_DIR)
        size = graph.tensor(graph.input).shape[1]
        count = images or manifest["config"].get("csim_images") or 20
        log(f"{step.name}: {graph.meta.get('model', 'model')} ({graph.meta.get('variant', '-')}) on {artifact.meta.get('board')}")
        results.append(run_checked_csim(artifact.folder / PROJECT_DIR, graph, csim_images(graph.meta.get("seed", 0), count, size), sanitize, log))
    return results
