"""Config, tokenizer and model, their loss and metrics: a component (imports only the bottom layer).

loading (from the hub, a folder or from scratch), loss (exact under gradient accumulation),
chunked_loss (--loss_chunk_size), metrics (streaming token accuracy, perplexity), eval_loss (the eval
loss per token), documents (which models keep packed documents apart).
"""
