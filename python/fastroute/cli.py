"""The `fastroute` command line: a thin dispatcher; each command lives beside its module."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, function, help). Each function takes the parsed args and returns an exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    'check': ('fastroute.config', 'cli_check', 'validate a config and print a summary (exit 1 on errors)'),
    'schema': ('fastroute.config', 'cli_schema', 'print the JSON Schema of the config'),
    'serve': ('fastroute.gateway', 'cli_serve', 'run the router (native uvloop server, or granian)'),
    'explain': ('fastroute.gateway', 'cli_explain', 'print the decision trace for a request JSON read on stdin'),
    'mock': ('fastroute.mock', 'cli_mock', 'run an OpenAI-compatible upstream simulator'),
    'demo': ('fastroute.demo', 'cli_demo', 'start simulated upstreams and the router, send a traffic mix, report'),
    'experiments': (
        'fastroute.experiments',
        'cli_experiments',
        'list, show, pause, resume, promote, roll back, set the weight of experiments (admin API)',
    ),
    'train': (
        'fastroute.classifier',
        'cli_train',
        'fit the complexity classifier on labelled prompts; write a model file',
    ),
    'eval': ('fastroute.classifier', 'cli_eval', 'routing quality of a classifier model (APGR, CPT) beside baselines'),
    'simulate': ('fastroute.simulate', 'cli_simulate', 'replay traffic through a config; shares, cost, quality, diff'),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported (so `fastroute check` stays light)."""
    parser = argparse.ArgumentParser(prog='fastroute', description='A very fast model router for LLM inference.')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, (module, func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            add_args = getattr(importlib.import_module(module), f'{func}_args', None)
            if add_args is not None:
                add_args(p)
        p.set_defaults(_target=(module, func))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith('-')), None)
    args = build_parser(command).parse_args(argv)
    module, func = args._target
    return int(getattr(importlib.import_module(module), func)(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
