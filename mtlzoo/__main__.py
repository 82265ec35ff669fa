"""``python -m mtlzoo``: the same as the ``mtlzoo`` command."""

from mtlzoo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
