"""`python -m vaelab` is the `vaelab` command."""

from vaelab.cli import command

if __name__ == "__main__":
    command()
