"""The flags: the argument dataclasses, parsed once and checked as they are built.

arguments (the dataclasses, parse_args), checks (the checks at parsing), secrets (hub tokens
masked), launch_flags (what the launchers ask of a user's flags).
"""
