"""The command line: one click group (main.py) and one small module per command family."""
