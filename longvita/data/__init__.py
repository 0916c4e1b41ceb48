"""Training data: samples, mixtures, labels, packing, loading. No torch.distributed."""
