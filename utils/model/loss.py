"""The loss a model's head computes, made exact under gradient accumulation.

The Trainer passes ``num_items_in_batch`` (the labelled tokens of the whole accumulated batch, on
all devices) to every model whose forward takes ``**kwargs``, and then no longer divides the loss
by the accumulation steps: the model's loss must be its share of that batch's summed loss.
"""

import inspect

from utils.model.metrics import IGNORE_INDEX


def _loss_uses_num_items(model) -> bool:
    """Whether the model's forward hands its loss kwargs (``num_items_in_batch``) to ``self.loss_function``."""
    try:
        return "loss_function(" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return True  # no source to read: trust the model


def weigh_loss_by_num_items(model, shift: bool = False) -> None:
    """Make a mean loss that ignores ``num_items_in_batch`` exact under gradient accumulation.

    Heads that compute a plain mean cross-entropy (RoBERTa's and BERT's masked-LM heads, XLNet's)
    ignore the count, which multiplied their gradients by the accumulation steps. Their mean over
    this micro-batch's labelled tokens becomes its share of the whole batch's sum instead.
    ``shift``: a causal LM, whose first label in each row predicts nothing (the count skips it,
    as the Trainer's ``num_items_in_batch`` does).
    """
    if _loss_uses_num_items(model):
        return

    def rescale(module, args, kwargs, output):
        total, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
        loss = output.get("loss") if isinstance(output, dict) else None
        if total is None or labels is None or loss is None:
            return None
        scored = labels[..., 1:] if shift else labels
        output["loss"] = loss.float() * (scored.ne(IGNORE_INDEX).sum() / total)
        return output

    model.register_forward_hook(rescale, with_kwargs=True)
