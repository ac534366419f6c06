"""`tokenmerge eval`: not written yet."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="not available yet")
    parser.set_defaults(run=run)


def run(args) -> None:
    raise NotImplementedError("tokenmerge eval is not written yet")
