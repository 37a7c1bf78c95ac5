"""The `loraforge` command line: the only module that parses arguments. Nothing imports it.

    loraforge quickstart                 # fine-tune the embedded model on BANKING77, before/after accuracy
    loraforge train run.yaml train.learning_rate=1e-3
    loraforge train run.yaml --resume    # continue a killed run from its last good checkpoint
    loraforge generate runs/x "Where is my card?"

Each subcommand imports its stage lazily, so `--help` answers at once. A `LoraforgeError` is printed as one
message without a traceback and the process exits with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from loraforge.errors import LoraforgeError

app = typer.Typer(
    name="loraforge",
    help="Fine-tune open-weight LLMs with LoRA/QLoRA: data -> plan -> train -> evaluate -> ship.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="key=value overrides of the config, e.g. train.learning_rate=1e-3 lora.r=32.",
                   show_default=False),
]


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Argument(help="YAML run config (see examples/).")] = None,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's last good checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder (otherwise refused).")] = False,
) -> None:
    """Fine-tune a LoRA/DoRA adapter as the config says; writes the adapter, metrics and checkpoints."""
    from loraforge.config import load_config
    from loraforge.train.run import run_training

    cfg = load_config(config, overrides or [])
    run_training(cfg, resume=resume, overwrite=overwrite)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="A run folder (base + adapter) or a base model.")],
    prompt: Annotated[list[str], typer.Argument(help="One or more user messages; each is answered.")],
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 128,
    system: Annotated[Optional[str], typer.Option(help="System prompt (default: the run's).")] = None,
) -> None:
    """Answer prompts with a fine-tuned run (or a bare base model), greedy decoding."""
    from loraforge.eval.generate import load_for_inference, generate_answers

    handle = load_for_inference(model)
    answers = generate_answers(handle, prompt, system=system, max_new_tokens=max_new_tokens)
    for p, a in zip(prompt, answers):
        typer.echo(f"> {p}\n{a}\n")


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="A run folder (base + adapter) or a base model.")],
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 256,
    system: Annotated[Optional[str], typer.Option(help="System prompt (default: the run's).")] = None,
) -> None:
    """Chat in the terminal with a fine-tuned run, answers streamed as they are generated."""
    from loraforge.eval.generate import chat_loop, load_for_inference

    chat_loop(load_for_inference(model), system=system, max_new_tokens=max_new_tokens)


@app.command()
def quickstart(
    output_dir: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/quickstart"),
    per_intent: Annotated[int, typer.Option(help="Training examples per intent (77 intents).")] = 10,
    test_size: Annotated[int, typer.Option(help="Test queries evaluated (seeded slice of the test set).")] = 300,
    epochs: Annotated[float, typer.Option(help="Passes over the training examples.")] = 3,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
) -> None:
    """The main job: fine-tune the embedded SmolLM2-135M-Instruct on BANKING77 and print before/after accuracy."""
    from loraforge.quickstart import run_quickstart

    run_quickstart(output_dir, per_intent=per_intent, test_size=test_size, epochs=epochs, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (2 for user errors)."""
    try:
        app(args=argv, standalone_mode=False)
    except LoraforgeError as e:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
        return 2
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        return int(code or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
