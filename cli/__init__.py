"""The ``fieldscope`` command line: one entry point, one subcommand per package."""
