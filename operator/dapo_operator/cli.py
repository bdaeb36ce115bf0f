"""`dapo-operator`: the operator's command (`python -m dapo_operator` is the same).

    dapo-operator run [--namespace NS ...]     run the operator (what the chart's Deployment runs)
    dapo-operator render FILE                  the Kubernetes objects the operator would create, offline

Errors are reported as `dapo` reports them (`dapo.cli.run_command`): a bad run file is one line
naming the field and the fix, exit 2. Each subcommand imports its module when it runs, so
`render` does not start kopf.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dapo.cli import run_command


def _call(module: str):
    return lambda args: importlib.import_module(module).main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dapo-operator", description="The DAPORun Kubernetes operator")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the Kubernetes operator")
    p.add_argument("--namespace", action="append", default=[], help="watch only these namespaces (repeatable); default all")
    p.add_argument("--metrics-port", type=int, default=8080)
    p.add_argument("--health-port", type=int, default=8081)
    p.set_defaults(func=_call("dapo_operator.main"))

    p = sub.add_parser("render", help="print the Kubernetes objects the operator would create for a run file")
    p.add_argument("file")
    p.add_argument("--namespace", default="default")
    p.add_argument("--image", default=None, help="runtime image (default: the operator's default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    p.set_defaults(func=_call("dapo_operator.render"))
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
