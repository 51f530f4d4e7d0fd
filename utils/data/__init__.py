"""Text in, training samples out: a component (imports only the bottom layer).

raw (reading hub datasets and local files), prepare (tokenize, pack into blocks), cache (the
tokenized-data cache), arrow_files (rows read and written by plain reads), fast_tokenize (the exact
tiktoken path), collators (batches with labels and masks), packing (--packing document: whole documents
in blocks, and batches of them).
"""
