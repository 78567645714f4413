"""The one exception type for mistakes a user can fix.

Library code raises :class:`UserError` when the input is wrong (a file that cannot be read, a flag with a
bad value, a target module that matches nothing). The message is one line that names the file, record,
module or flag and says what would be right. The command-line layer (:func:`minipeft.cli.run`) prints it
as ``error: <message>`` and exits with status 2, without a traceback. Anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line without a traceback."""
