"""The one exception type that means "the user gave bad input".

The CLI turns a UserError into a single line on stderr and exit code 2; anything
else is a bug and keeps its traceback.

A library error names settings as the Python API spells them, in backticks (`gen_width` must be
>= 1); the CLI shows each as its flag (--gen-width), `cli.common.flags_for_settings` being the one
place that maps the two.
"""


class UserError(Exception):
    """Bad input: what was wrong and what to do, in one line."""
