"""``--use_liger_kernel`` only where it does something.

transformers hands the model to Liger, whose table (``MODEL_TYPE_TO_APPLY_LIGER_FN``: Llama,
Mistral, Gemma, Qwen2, ...) says which model types it patches; for any other it logs at info
level that it has no kernels and returns. GPT-2, BERT, RoBERTa and XLNet, the models these
scripts train from their defaults, are not in it, so the flag did nothing, silently. Here a run
whose model Liger has no kernels for says so in one warning and turns the flag off; without
liger-kernel installed, the flag is refused in one line (transformers would stop with a traceback
at the start of training).
"""

from __future__ import annotations

import logging

from utils.errors import UsageError

logger = logging.getLogger(__name__)


def liger_model_types() -> set[str]:
    """The model types Liger has kernels for, from its own table."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as err:
        raise UsageError(f"--use_liger_kernel: liger-kernel cannot be imported ({err}); install it "
                         "(pip install liger-kernel, which needs Triton and a GPU) or drop the flag") from None
    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def check_liger(args, model) -> None:
    """Before training: turn --use_liger_kernel off, with a warning, for a model Liger has no kernels for."""
    if not args.use_liger_kernel:
        return
    model_type = model.config.model_type
    supported = liger_model_types()
    if model_type not in supported:
        logger.warning("--use_liger_kernel does nothing for %s: Liger has kernels for %s only; turned off "
                       "(--loss_chunk_size computes the output layer and the loss in chunks for any model)",
                       model_type, ", ".join(sorted(supported)))
        args.use_liger_kernel = False
