"""Command-line tools run by ``python -m greenpool``: each module is one command."""
