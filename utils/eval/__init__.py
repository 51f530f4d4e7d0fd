"""Evaluation figures that compare across tokenizers, block sizes and published numbers.

text_units (the UTF-8 bytes and words each token of a stream owns, and the loss per byte and per
word), windows (disjoint blocks and sliding windows over a token stream, and their samples),
loss_sum (the evaluation loss summed token by token, over processes), causal (run_clm.py's
evaluation text: one stream with its text units, cut into blocks or windows).
"""
