"""The cost model shared by both planning passes: compute (roofline), communication (alpha-beta)
and memory (training state and activations)."""

from autopar.cost.comm import COLLECTIVES, CommCost, CommModel, flat_cost, mst_time, ring_time
from autopar.cost.compute import ComputeModel, ProfileTable, mfu, roofline_time
from autopar.cost.memory import (ActivationMemory, StateBytes, activation_memory, normalize_precision,
                                 state_bytes_per_param, training_state)

__all__ = ["COLLECTIVES", "ActivationMemory", "CommCost", "CommModel", "ComputeModel", "ProfileTable",
           "StateBytes", "activation_memory", "flat_cost", "mfu", "mst_time", "normalize_precision",
           "ring_time", "roofline_time", "state_bytes_per_param", "training_state"]
