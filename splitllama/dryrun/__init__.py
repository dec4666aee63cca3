"""Dry run of a job at its real world size without GPUs: per pipeline stage, one representative
rank runs the real model stage, DDP, distributed optimizer and one training step on fake tensors
under a fake process group and a memory tracker (`stage`), in its own process (`worker`);
`run` resolves the job, starts the workers and reports memory per stage beside the planner's
prediction. Above `splitllama.training` (it builds the model and optimizer the same way)."""
