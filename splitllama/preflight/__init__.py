"""Pre-flight: every decision of a run, made once before torch.distributed starts, into a frozen `RunPlan`."""
