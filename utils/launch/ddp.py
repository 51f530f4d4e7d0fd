"""DDP's ``find_unused_parameters`` from what the model really does.

With it on, DDP walks the autograd graph after every forward to find parameters that will get
no gradient, and torch warns at the first step when it found none. transformers turns it on for
every model. Here one forward and backward of two real training samples (through the run's own
collator, in full precision, with the random state put back afterwards) shows which parameters
get no gradient; it is on only when some do. ``--ddp_find_unused_parameters`` still decides when given.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def unused_parameters(model, collator, dataset, n_samples: int = 2) -> list[str]:
    """Names of the trainable parameters that one training step on real samples leaves without a gradient."""
    examples = _first_examples(dataset, n_samples)
    saved_grads = {name: p.grad for name, p in model.named_parameters()}
    was_training = model.training
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type not in ("cpu", "meta") else []
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            model.train()
            for parameter in model.parameters():
                parameter.grad = None
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collator(examples).items()}
            outputs = model(**batch)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
            loss.backward()
            return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        for name, parameter in model.named_parameters():
            parameter.grad = saved_grads[name]
        model.train(was_training)


def _first_examples(dataset, n_samples: int) -> list:
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        examples = []
        for example in dataset:
            examples.append(example)
            if len(examples) == n_samples:
                break
        return examples
    return [dataset[i] for i in range(min(n_samples, len(dataset)))]


def set_find_unused_parameters(args, model, collator, dataset) -> None:
    """Before the Trainer builds its DDP settings: on only if the model leaves parameters unused."""
    if args.world_size <= 1 or args.ddp_find_unused_parameters is not None or dataset is None or collator is None:
        return
    if getattr(model, "is_activation_checkpointing", False) or getattr(args, "activation_checkpointing", False):
        return  # transformers turns it off then, for checkpointing's sake
    unused = unused_parameters(model, collator, dataset)
    args.ddp_find_unused_parameters = bool(unused)
    if unused:
        logger.info("DDP: find_unused_parameters on: %d parameters get no gradient (%s)", len(unused),
                    ", ".join(unused[:5]))
    else:
        logger.info("DDP: find_unused_parameters off: every parameter gets a gradient")
