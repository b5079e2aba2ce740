"""User-facing errors: the CLI prints these as one line, never as a traceback."""


class UserError(Exception):
    """A mistake in the input (config, path, data), explained in one line that names the key or file."""


class Stop(Exception):
    """A job that ends early by design (e.g. one shard of a database built): reported in one line, exit 0."""
