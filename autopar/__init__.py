"""autopar: an auto-parallelization compiler for PyTorch.

    import autopar
    cluster = autopar.Cluster.preset("h100", nodes=8, gpus_per_node=8)
    captured = autopar.capture(model, (tokens,), loss_fn=loss, target=targets)
"""

from autopar.capture import capture
from autopar.cluster import Cluster, DeviceSpec, Link, PeakFlops
from autopar.errors import AutoparError, CaptureError, InfeasibleError

__version__ = "0.1.0"
__all__ = ["AutoparError", "CaptureError", "Cluster", "DeviceSpec", "InfeasibleError", "Link", "PeakFlops",
           "capture"]
