"""Placeholder until the CLI lands."""


def main() -> None:
    raise SystemExit("casern: the command line is not built yet")
