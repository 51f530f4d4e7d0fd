"""Mixed precision in plain PyTorch, apex's O-levels on any device: a component (imports only the bottom layer).

config (AmpConfig), casting (the model per O-level), scaler (loss scale, overflow checks),
master_store and combine_grad (where masters and grads live), optimizer (MixedPrecisionOptimizer),
weights (fp32 saving), apex_bridge (apex's amp behind the same interface).
"""
