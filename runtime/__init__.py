"""The runtime: a plan lowered to per-rank programs and run on torch.distributed (gloo on CPU,
NCCL on GPUs). `world` joins the process group, `collectives` changes placements, `kernels` runs
the special rules, `params` holds parameters as the plan says, `lower` builds each rank's program,
`compiled` runs training steps."""
