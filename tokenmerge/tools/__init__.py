"""The command-line tools (``tokenmerge bench``, ``eval``, ``compare``, ``tune``,
``visualize``, ``train``, ``export``) and the pieces they share, beside the core
library they measure.

Every command is a module with ``add_parser(subparsers)``; what commands share lives
in modules of its own (``options``: the one vocabulary of arguments and the checks
made before any work; ``settings``: the ways to run a model; ``timing``; ``accuracy``;
``distributed``; ``reports``; ``models``; ``data``; ``tuning``: the schedule search
and its measurements). No command imports another.
"""
