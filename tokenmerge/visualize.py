"""`tokenmerge visualize`: not written yet."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("visualize", help="not available yet")
    parser.set_defaults(run=run)


def run(args) -> None:
    raise NotImplementedError("tokenmerge visualize is not written yet")
