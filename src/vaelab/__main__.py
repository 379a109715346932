"""`python -m vaelab` is the `vaelab` command."""

from vaelab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
