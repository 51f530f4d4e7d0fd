"""The run folder: --output_dir's names, lock and record, and checkpoints that are complete or absent.

folder (RunFolder: the one owner of the folder's state), checkpoints (names, markers, publishing,
clearing), resume_check (can this model resume from that checkpoint).
"""
