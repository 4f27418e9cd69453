"""Model, optimizer and run state on torch.distributed.checkpoint (see megads.checkpoint.dcp)."""
