"""Devices and processes: which accelerator, how many processes, how they start and stop.

device (NPU/CUDA/CPU), cpu (allocator, precision hints), auto_ddp (one process per device), ddp
(find_unused_parameters from the model), torchrun (graceful stops, restarts), signals (a stop before
training begins), start (start_run).
"""
