"""mkdocs hooks: the CLI reference page, generated from the parser at every build (so it cannot go stale)."""

import io
import os
import sys
from contextlib import redirect_stdout

from mkdocs.structure.files import File

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

PAGE = "cli-reference.md"


def _help(parser, argv) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        try:
            parser.parse_args(argv + ["--help"])
        except SystemExit:
            pass
    return out.getvalue()


def reference() -> str:
    """The page: `hyperadalora --help` and the --help of every subcommand, as the CLI prints them."""
    from hyperadalora import cli

    os.environ["COLUMNS"] = "118"
    parser = cli.build_parser()
    parts = ["# CLI reference\n",
             "Generated from the parser (`hyperadalora ... --help`) when the site is built. The flags of `train` and "
             "`demo` are those of transformers' `TrainingArguments` and TRL's `ModelConfig`, with the earlier names "
             "after them; `--config run.yaml` takes the same names as keys. [The command line guide](guides/cli.md) "
             "explains them.\n"]
    for title, argv in (("hyperadalora", []), ("hyperadalora train", ["train"]), ("hyperadalora demo", ["demo"]),
                        ("hyperadalora experiment", ["experiment"]), ("hyperadalora export", ["export"])):
        parts.append(f"## `{title}`\n\n```text\n{_help(parser, argv).rstrip()}\n```\n")
    return "\n".join(parts)


def on_files(files, config):
    files.append(File.generated(config, PAGE, content=reference()))
    return files
