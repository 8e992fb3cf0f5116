"""The cost model shared by both planning passes: compute (roofline), communication (alpha-beta)
and memory (training state and activations); measured figures from `autopar profile` where a
cluster carries them."""

from autopar.cost.comm import COLLECTIVES, CommCost, CommModel, flat_cost, mst_time, ring_time
from autopar.cost.compute import ComputeModel, ProfileTable, kernel_time, mfu, roofline_time
from autopar.cost.memory import (ActivationMemory, StateBytes, activation_memory, normalize_precision,
                                 state_bytes_per_param, training_state)
from autopar.cost.profile import CollectiveFit, MatmulRate, Profile, fit_alpha_beta

__all__ = ["COLLECTIVES", "ActivationMemory", "CollectiveFit", "CommCost", "CommModel", "ComputeModel",
           "MatmulRate", "Profile", "ProfileTable", "StateBytes", "activation_memory", "fit_alpha_beta", "flat_cost",
           "kernel_time", "mfu", "mst_time", "normalize_precision", "ring_time", "roofline_time",
           "state_bytes_per_param", "training_state"]
