"""The user's mistakes: UserError, and the one-line report a CLI makes of it (run_cli).

The lowest module of the project: every other one may raise UserError.
"""
import errno
import os
import sys

# the errors of a write that the disk, not the program, refuses: no space, a file-size limit, a quota
FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class UserError(Exception):
    """A mistake in the user's input: reported as one line, without a traceback."""


def run_cli(main_fn, argv=None):
    """Call `main_fn(argv)`; a UserError becomes 'error: <message>' on stderr and exit status 2."""
    try:
        return main_fn(argv)
    except UserError as err:
        print('error: %s' % one_line(str(err)), file=sys.stderr)
        sys.exit(2)
    except PermissionError as err:  # an output folder that is not writable, found late
        print('error: permission denied: %s' % (err.filename or err), file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a full disk met by a write that is not run.config.atomic_write (a figure, np.save)
        if err.errno not in FULL_DISK:
            raise
        print('error: cannot write %s: %s' % (err.filename or 'a result file', os.strerror(err.errno).lower()),
              file=sys.stderr)
        sys.exit(2)


def one_line(message):
    """The user's line of an error message. A UserError raised in a DataLoader worker comes back
    wrapped in the worker's traceback; its own message is the last line, after 'UserError: '."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    last = lines[-1]
    return last.split(': ', 1)[1] if last.split(': ', 1)[0].endswith('Error') and ': ' in last else last
