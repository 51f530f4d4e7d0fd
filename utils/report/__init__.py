"""What a run says about itself: the speed clock, run_info.json, the results row, table and model card.

speed (FPS, tokens/s, MFU), run_info (the setup as it ran), results (row, table, card from a run's
files), summary (the launcher's row).
"""
