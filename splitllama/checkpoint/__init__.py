"""Checkpoints on disk, shared by training and the converter (no torch.distributed in the pure
ones): ``dirs`` (directory layout: ``latest``, ``iter_N``, ``COMPLETE``, atomic finalize,
prune), ``lock`` (one writer per save directory), ``dcp_metadata`` (reading ``.metadata``
without unpickling, file-size checks), ``model_io`` (the model's sharded state dict and a
weights-only load). Saving and resuming a training run is ``splitllama.training.checkpointing``."""
