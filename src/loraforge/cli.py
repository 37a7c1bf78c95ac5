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


@app.command()
def plan(
    config: Annotated[Optional[Path], typer.Argument(help="YAML run config; the flags below override it.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Family name, Hub id or folder with config.json.")] = None,
    method: Annotated[Optional[str], typer.Option(help="full | lora | qlora (default: from the config).")] = None,
    seq: Annotated[Optional[int], typer.Option(help="Sequence length in tokens.")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Examples per micro-batch.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step.")] = None,
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank r.")] = None,
    targets: Annotated[Optional[str], typer.Option(help="Comma-separated LoRA modules, or all-linear.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(help="Recompute activations in backward.")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw | adamw_8bit | paged_adamw_8bit.")] = None,
    packing: Annotated[Optional[bool], typer.Option(help="Pack examples into full rows (no padding).")] = None,
    offload: Annotated[Optional[bool], typer.Option(help="Keep optimizer states in CPU RAM.")] = None,
    examples: Annotated[Optional[int], typer.Option(help="Training examples (default: from data.train).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the examples.")] = None,
    avg_tokens: Annotated[Optional[int], typer.Option(help="Average tokens per example.")] = None,
    gpu: Annotated[Optional[str], typer.Option(help="Card to fit, e.g. 4090 or 'A100 80GB'; suggests fixes.")] = None,
    prices: Annotated[Optional[Path], typer.Option(help="YAML/JSON of GPU name -> USD/hour (overrides).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Estimate peak GPU memory, fit per card, speed, wall time and cost of a run, before renting a GPU."""
    from loraforge.config import load_config
    from loraforge.plan import from_config, plan_run

    inputs = from_config(
        load_config(config), model=model, method=method, seq=seq, batch=batch, grad_accum=grad_accum, rank=rank,
        targets=None if targets is None else tuple(targets.split(",")), gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer, packing=packing, offload=offload, examples=examples, epochs=epochs, avg_tokens=avg_tokens,
    )
    report = plan_run(inputs, gpu=gpu, prices_file=prices)
    if json_out:
        typer.echo(report.to_json())
    else:
        from loraforge.plan.render import render

        render(report)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (2 for user errors)."""
    try:
        app(args=argv, standalone_mode=False)
    except LoraforgeError as e:
        from rich.console import Console
        from rich.text import Text

        Console(stderr=True, highlight=False, soft_wrap=True).print(Text("error: ", style="bold red") + Text(str(e)))
        return 2
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        return int(code or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # usage errors (typer's click exceptions) arrive here in non-standalone mode
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            return int(e.exit_code)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
