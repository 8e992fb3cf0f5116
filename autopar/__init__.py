"""autopar: an auto-parallelization compiler for PyTorch.

    import autopar
    cluster = autopar.Cluster.preset("h100", nodes=8, gpus_per_node=8)
    plan = autopar.plan(model, cluster, example_inputs=(tokens,), loss_fn=loss, target=targets)
    print(plan.summary())
"""

from autopar import models
from autopar.capture import capture
from autopar.cluster import Cluster, DeviceSpec, Link, PeakFlops
from autopar.compiler import compile
from autopar.errors import AutoparError, CaptureError, InfeasibleError
from autopar.plan import Plan
from autopar.planner import plan
from autopar.passes.split import PipelineSpec

__version__ = "0.1.0"
__all__ = ["AutoparError", "CaptureError", "Cluster", "DeviceSpec", "InfeasibleError", "Link", "PeakFlops",
           "PipelineSpec", "Plan", "capture", "compile", "models", "plan"]
