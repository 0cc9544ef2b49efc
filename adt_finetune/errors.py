"""The one exception type that means "the user gave bad input".

The CLI turns a UserError into a single line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: what was wrong and what to do, in one line."""
