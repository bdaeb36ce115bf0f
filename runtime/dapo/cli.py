"""`dapo`: the runtime's command: the laptop run, the pods' roles, the CRD, the curves.

Each subcommand imports its module lazily so `dapo crd` does not pay for torch. The operator's
commands (`dapo-operator run`, `dapo-operator render FILE`) are the operator package's own
(`dapo_operator.cli`): the runtime image and its pods never need the operator.
"""

from __future__ import annotations

import argparse
import sys

from dapo.contracts import RUN_FILE_ERROR_EXIT_CODE
from dapo.errors import ConfigError, DapoError
from dapo.spec import SpecError


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train a DAPORun on this machine (the embedded default)")
    p.add_argument("file", help="run file (YAML, kind DAPORun)")
    p.add_argument("--output-dir", default=None, help="run directory (default runs/NAME)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override one field, e.g. --set spec.learner.lr=2e-6 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest committed checkpoint")
    p.add_argument("--launcher", choices=["inprocess", "processes"], default="inprocess",
                   help="inprocess: every role in this process; processes: each role a local process on loopback")
    p.add_argument("--cpus", action="append", default=[], metavar="ROLE=CPUS",
                   help="with --launcher processes (Linux): pin a role's processes to CPUs, e.g. --cpus learner=0 "
                        "--cpus rollout,reward=1 (repeatable; CPUS like 0, 0,2 or 1-3; all ranks of a role share them)")
    p.set_defaults(func=lambda a: _lazy("dapo.entry.inprocess", "main_run")(a))


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check a run file without training: schema, model, data, scorers, memory (exit 2 on a problem)")
    p.add_argument("file", help="run file (YAML, kind DAPORun)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override one field, as for dapo run (repeatable)")
    p.set_defaults(func=lambda a: _lazy("dapo.preflight", "main")(a))


def _add_crd(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crd", help="print the DAPORun CustomResourceDefinition generated from the spec model")
    p.set_defaults(func=lambda a: _lazy("dapo.crd", "main")(a))


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="write PNG training curves of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output PNG (default RUN_DIR/curves.png)")
    p.set_defaults(func=lambda a: _lazy("dapo.plot", "main")(a))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint or model: avg@n, pass@k, maj@k per data source")
    p.add_argument("model", help="run folder, checkpoint (local or s3://), Hugging Face folder, builtin:NAME or .gguf")
    p.add_argument("--data", required=True, help="evaluation prompts (.parquet / .jsonl, local or s3://)")
    p.add_argument("--n", type=int, default=None, help="samples per problem (default: the run file's spec.eval.n)")
    p.add_argument("--k", default=None, help="report pass@k and maj@k for these k, e.g. 1,8,32 (each <= n)")
    p.add_argument("--engine", choices=["hf", "vllm"], default=None, help="generation engine (default: the run file's)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the latest committed)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside a model folder")
    p.add_argument("--run-file", default=None, help="settings (template, lengths, scorer) when the model has none")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override one field of the settings, as for dapo run (repeatable)")
    p.add_argument("--json", default=None, help="write the figures as JSON here")
    p.add_argument("--samples", default=None, help="write every sample as a JSON line here")
    p.add_argument("--store-result", action="store_true",
                   help="store the result beside the checkpoint (evals/step-N.json), for the run that made it")
    p.set_defaults(func=lambda a: _lazy("dapo.evaluation.command", "main")(a))


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint's policy as a plain Hugging Face folder")
    p.add_argument("source", help="run folder, checkpoint (local or s3://)")
    p.add_argument("out_dir", help="the folder to write (must not exist or be empty)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the latest committed)")
    p.set_defaults(func=lambda a: _lazy("dapo.export", "main")(a))


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="overlay the curves of several runs in one PNG, with a table")
    p.add_argument("runs", nargs="+", help="run folders or checkpoint prefixes (local or s3://)")
    p.add_argument("--metric", action="append", default=[], help="metric to plot (repeatable; default val/acc/mean)")
    p.add_argument("--out", default="compare.png", help="output PNG (default compare.png)")
    p.set_defaults(func=lambda a: _lazy("dapo.compare", "main")(a))


def _add_role(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("role", help="run one role of a distributed run (what the pods execute)")
    p.add_argument("role", choices=["learner", "rollout", "reward"])
    p.add_argument("--config", default=None, help="run file (default: $DAPO_RUN_FILE, the operator's ConfigMap)")
    p.set_defaults(func=lambda a: _lazy("dapo.entry.roles", "main")(a))


def _lazy(module: str, attr: str):
    import importlib

    return getattr(importlib.import_module(module), attr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dapo", description="DAPO reinforcement learning, on one machine or on Kubernetes")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_check, _add_eval, _add_export, _add_compare, _add_crd, _add_plot, _add_role):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand (``args.func``); the platform's refusals become one line on
    stderr and an exit code (the operator's command shares this)."""
    try:
        return int(args.func(args) or 0)
    except (SpecError, ConfigError) as exc:  # a bad run file / setting: the message names it and the fix
        from dapo.preflight import PreflightError

        lines = str(exc).splitlines() if isinstance(exc, PreflightError) else [str(exc)]
        for line in lines:  # `dapo run`'s check: one error line per problem
            print(f"error: {line}", file=sys.stderr)
        return RUN_FILE_ERROR_EXIT_CODE
    except DapoError as exc:  # the platform refused at run time and says why: no traceback
        # a guardrail that stopped the run has its own label and exit code (dapo.controller.guardrails)
        print(f"{getattr(exc, 'label', 'error')}: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))


if __name__ == "__main__":
    sys.exit(main())
