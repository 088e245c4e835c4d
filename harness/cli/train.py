"""``harness train <kind>``: train a model the harness ships (one subcommand per registered trainer)."""

from __future__ import annotations


def cmd_train(args) -> int:
    """``harness train <kind>``: run the chosen trainer on the parsed arguments."""
    return args.trainer.run(args)


def add_parser(sub) -> None:
    """Register ``harness train`` with a subcommand per trainer in :mod:`harness.training`."""
    from harness.training import load_trainers

    tr = sub.add_parser("train", help="train a model the harness ships")
    trs = tr.add_subparsers(dest="kind", required=True)
    for name, trainer in load_trainers().items():
        tp = trs.add_parser(name, help=trainer.help)
        trainer.add_arguments(tp)
        tp.set_defaults(func=cmd_train, trainer=trainer)
