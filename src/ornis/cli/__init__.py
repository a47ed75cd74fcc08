"""The ``ornis`` command: thin sub-commands that parse arguments and call the library."""
