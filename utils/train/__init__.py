"""The Trainer and what happens around it: the only code that subclasses or patches transformers' Trainer.

trainer (LMTrainer), steps (train, save, evaluate), precision (mixed precision's Trainer hooks),
checkpointing (complete-or-absent saves), stops (preemption, non-finite losses), loss_tally (the
reported training loss), failures (full
disk, unreadable streams), sharding (FSDP on CPU processes, and its proof).
"""
