"""The one error type the command line turns into a one-line message and exit 2."""


class LampError(Exception):
    """Bad input or an impossible request, explained in one line."""


def data_error(path, message, example_id=None, field=None) -> LampError:
    """An error that names the file, and the example id and field where known."""
    where = str(path)
    if example_id is not None:
        where += f": id {example_id!r}"
    if field is not None:
        where += f": field {field!r}"
    return LampError(f"{where}: {message}")
