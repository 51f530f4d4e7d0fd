"""The output layer and the cross-entropy a chunk of tokens at a time (``--loss_chunk_size``).

A language model's last layer turns every token's hidden state into one score per vocabulary
entry: ``[tokens, vocabulary]`` floats (for GPT-2 at batch 8 and block 1024, 1.6 GB in fp32),
kept for the backward pass with a gradient of the same size. The loss needs only one number per
token and the accuracy one argmax. Here the scores of ``chunk`` tokens at a time are computed,
reduced to their loss (and, in evaluation, their argmax), and turned at once into their share
of the gradients of the hidden states and of the layer's weight and bias; the next chunk reuses
the memory. The sum runs
in another order than one cross-entropy over all tokens, so losses can differ in the last bits
of fp32: opt-in.
"""

from __future__ import annotations

import contextlib

import torch

from utils.errors import UsageError
from utils.model.metrics import IGNORE_INDEX


def _loss_and_gradients(hidden, weight, bias, targets, chunk: int, wants: tuple[bool, bool, bool],
                        vocabulary: int | None = None):
    """Summed cross-entropy and the gradients of the sum asked for by ``wants`` (else None); the argmax
    ids when no gradient is asked for (evaluation), else None: a pass over the scores training does not need.
    ``vocabulary``: the true entries of a padded output layer; the scores of the others are -inf."""
    # The hidden states' gradient is written chunk by chunk, row for row; the others are sums over chunks.
    grads = [None if t is None or not want else
             torch.empty(t.shape, dtype=torch.float32, device=t.device) if t is hidden else
             torch.zeros(t.shape, dtype=torch.float32, device=t.device)
             for t, want in zip((hidden, weight, bias), wants)]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    training = any(wants)
    predictions = None if training else torch.empty(targets.shape, dtype=torch.long, device=hidden.device)
    compute_dtype = weight.dtype
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        inputs = hidden[rows].to(compute_dtype)
        scores = torch.nn.functional.linear(inputs, weight, bias).float()
        if vocabulary is not None:
            scores[:, vocabulary:] = float("-inf")  # padding (utils/model/vocab_padding.py): no share of the softmax
        labels = targets[rows]
        scored = labels != IGNORE_INDEX
        picked = labels.clamp_min(0)
        label_scores = scores.gather(1, picked.unsqueeze(1)).squeeze(1)
        if not training:
            predictions[rows] = scores.argmax(-1)
        # In place, so that a chunk holds one [chunk, vocabulary] buffer: exp(scores - their maximum),
        # the softmax times its row sum. The loss is log(sum) + maximum - the label's score.
        top = scores.amax(-1, keepdim=True)
        scores.sub_(top).exp_()
        sums = scores.sum(-1)
        total += ((sums.log() + top.squeeze(1) - label_scores) * scored).sum()
        if not training:
            continue
        # d(loss)/d(scores) = scores / sums - one-hot of the label. The 1 / sums, and the mask of the rows
        # with nothing to predict, go into the [chunk, width] factors; the one-hot part is rows of the
        # weight (or of the inputs) added at the labels: no further pass over the [chunk, vocabulary] buffer.
        mask = scored.to(torch.float32).unsqueeze(1)
        row_scale = mask / sums.unsqueeze(1)
        exp_scores = scores.to(compute_dtype)
        if grads[0] is not None:
            grads[0][rows] = (exp_scores @ weight).float() * row_scale - weight[picked].float() * mask
        if grads[1] is not None:
            grads[1] += (exp_scores.T @ (inputs.float() * row_scale).to(compute_dtype)).float()
            grads[1].index_add_(0, picked, inputs.float() * -mask)
        if grads[2] is not None:
            grads[2] += row_scale.squeeze(1) @ scores
            grads[2].index_add_(0, picked, -mask.squeeze(1))
    return total, predictions, grads


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``.

    The gradients are computed in the forward pass, chunk by chunk, while each chunk's scores are
    at hand; the backward pass only scales them by the incoming gradient of the summed loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, vocabulary: int | None):
        total, _, grads = _loss_and_gradients(hidden, weight, bias, targets, chunk, tuple(ctx.needs_input_grad[:3]),
                                              vocabulary)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.has = [g is not None for g in grads]
        ctx.dtypes = [t.dtype if t is not None else None for t in (hidden, weight, bias)]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [(g * grad_total).to(dtype) if has else None
                 for g, has, dtype in zip(ctx.saved_tensors, ctx.has, ctx.dtypes)]
        return *grads, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk: int,
                         vocabulary: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(summed loss, argmax ids)`` of the scores ``hidden @ weight.T + bias``, ``chunk`` rows at a time.

    ``hidden`` is ``[..., width]`` and ``targets`` the matching ``[...]`` ids, IGNORE_INDEX where
    nothing is predicted. Under ``torch.no_grad()`` (evaluation) the argmax ids come too, in the
    shape of ``targets``; with gradients (training) they are None. ``vocabulary``: the true entries
    of a padded output layer (the scores past them count as -inf).
    """
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled():
        return _LinearCrossEntropy.apply(flat_hidden, weight, bias, flat_targets, chunk, vocabulary), None
    total, predictions, _ = _loss_and_gradients(flat_hidden, weight, bias, flat_targets, chunk, (False,) * 3,
                                                vocabulary)
    return total, predictions.view(targets.shape)


@contextlib.contextmanager
def hidden_states_out(head: torch.nn.Module):
    """Let the output layer ``head`` pass its input through, so the model returns hidden states as logits."""
    head.forward = lambda hidden, *args, **kwargs: hidden
    try:
        yield
    finally:
        del head.forward


class ChunkedLoss:
    """The Trainer's ``compute_loss_func`` for ``--loss_chunk_size``: the model's loss, from its hidden states.

    It gives what the model's own loss gives: the summed cross-entropy over ``num_items_in_batch``
    (the labelled tokens of the whole accumulated batch) when the Trainer passes it, else the mean
    over this batch's labelled tokens; ``shift`` for causal LMs, whose position i predicts token
    i + 1. The outputs' logits are replaced by the argmax ids, all the accuracy needs.
    ``vocabulary``: the true entries of a padded output layer (utils/model/vocab_padding.py).
    """

    def __init__(self, head: torch.nn.Module, chunk: int, shift: bool, vocabulary: int | None = None):
        self.head, self.chunk, self.shift, self.vocabulary = head, chunk, shift, vocabulary

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) if self.shift else labels
        total, predictions = linear_cross_entropy(outputs.logits, self.head.weight, self.head.bias, targets,
                                                  self.chunk, self.vocabulary)
        outputs.logits = predictions  # None in training, where the Trainer does not read them
        count = num_items_in_batch if num_items_in_batch is not None else targets.ne(IGNORE_INDEX).sum()
        return total / count


# The chunk of the default: large enough to keep the matrix products efficient (at 256 tokens a
# step of a tiny GPT-2 was 14 to 18% slower on the CPU), at most 1024 x vocabulary floats at a time.
DEFAULT_CHUNK = 1024


def loss_chunk_size(args, model, causal: bool, scores_needed: bool = False) -> int:
    """The chunk this run uses: ``--loss_chunk_size`` when given (refused where it cannot serve the model),
    else the default. ``scores_needed``: the evaluation sums its loss from the scores, which the chunked
    loss does not keep (packed documents, sliding windows: utils/eval/loss_sum.py).

    By default a causal LM's loss is chunked when the run trains on the CPU: there it was faster
    than the model's own loss and kept peak memory below the stock pipeline's (docs/benchmarks.md).
    Elsewhere it stays off until measured (benchmarks/bench_gpu.py has both rows), and where it
    cannot serve the run: --torch_compile, --label_smoothing_factor, --fsdp, an output layer that is
    not a plain linear layer, DDP with find_unused_parameters.
    """
    if args.loss_chunk_size is not None:
        if args.loss_chunk_size and scores_needed:
            raise UsageError(f"--loss_chunk_size {args.loss_chunk_size} with an evaluation that sums its loss token "
                             "by token (--eval_stride, --packing document) from the scores, which the chunked loss "
                             "does not keep: leave --loss_chunk_size at 0, or evaluate in a run of its own")
        if args.loss_chunk_size:
            check_chunked_loss(args, model)
        return args.loss_chunk_size
    serves = (causal and not scores_needed and args.device.type == "cpu" and not args.torch_compile and not args.label_smoothing_factor
              and not args.fsdp and _misfit(args, model) is None)
    return DEFAULT_CHUNK if serves else 0


def _misfit(args, model) -> str | None:
    """Why the chunked loss would not be this model's loss in this run, or None."""
    if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        return f"{type(model).__name__}'s output layer is not a plain linear layer; leave it at 0"
    if args.world_size > 1 and args.ddp_find_unused_parameters:
        # DDP would count the output layer as unused (it is not reached from the model's outputs).
        return (f"the chunked loss does not work with DDP's find_unused_parameters, which this model needs "
                f"({type(model).__name__}): leave it at 0 for multi-process runs")
    return None


def check_chunked_loss(args, model) -> None:
    """Once the model and DDP's settings are known: refuse where the chunked loss would not be the model's loss."""
    reason = _misfit(args, model)
    if reason is not None:
        raise UsageError(f"--loss_chunk_size {args.loss_chunk_size}: {reason}")
