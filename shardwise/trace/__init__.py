"""The trace tier: the run tier's real training step on fake tensors and a fake process group, at any model and world size, in one process (tracer.py, fake.py, ddp.py)."""
