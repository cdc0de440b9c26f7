"""CPU kernels for the ConvFirst block (models/convfirst.py, deploy form): grouped k x k conv, 1x1 expand,
ReLU/GELU, 1x1 project and residual, fused tile by tile (or layer by layer, for comparison); C + OpenMP,
compiled at first use with the BlockFFN build machinery.

    fb = FusedConvFirstBlock.from_block(deployed_block)
    y = fb(x)                              # NCHW in, NCHW out; fb.nhwc(x) skips the layout conversion
    logits = run_fused(deployed_model, image)
"""

from edgekit.runtimes.convfirst.kernel import FusedConvFirstBlock, kernel_info, run_fused

__all__ = ["FusedConvFirstBlock", "kernel_info", "run_fused"]
