"""The `loraforge` command line: the only package that parses arguments. Nothing outside it imports it.

    loraforge quickstart                 # fine-tune the embedded model on BANKING77, before/after accuracy
    loraforge train run.yaml train.learning_rate=1e-3
    loraforge train run.yaml --resume    # continue a killed run from its last good checkpoint
    loraforge generate runs/x "Where is my card?"

Each subcommand imports its stage lazily, so `--help` answers at once (`python -X importtime`, loaded 2-core
box: `import loraforge.cli` 0.33 s; at the top the data commands' modules would add 0.7 s, eval 1 s, train
10 s). A `LoraforgeError` is printed as one message without a traceback. Exit codes: 0 done (or nothing to do), 2 a mistake to fix (config, data, model,
usage), 3 stopped on purpose (SIGTERM / Ctrl-C) with a checkpoint saved: `--resume` continues, 130 quit by a
second Ctrl-C without saving, 1 an unexpected failure (a bug: a traceback).
"""

from __future__ import annotations

import os
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
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder (otherwise refused); the old "
                                                 "one is kept until the new run has started.")] = False,
    resume_with_changes: Annotated[bool, typer.Option(help="Let --resume continue with a config that changes "
                                                           "training (recorded in resume_changes.jsonl).")] = False,
    gpus: Annotated[int, typer.Option(help="Data-parallel processes on this machine, one per GPU (relaunches "
                                           "through torchrun; with train.device=cpu: CPU processes).")] = 1,
    profile: Annotated[Optional[Path], typer.Option(help="Write torch.profiler tables and a trace of a few of "
                                                         "the run's steps (from step 21) into this folder.")] = None,
) -> None:
    """Fine-tune a LoRA/DoRA adapter as the config says; writes the adapter, metrics and checkpoints
    (and, when eval.test is set, the evaluation report in RUN_DIR/eval/)."""
    from loraforge.config import load_config
    from loraforge.train import distributed as D

    cfg = load_config(config, overrides or [])
    if gpus != 1 and not D.launched_by_torchrun():
        D.check_gpu_count(gpus, cfg.train.device)
        args = ["train", *([str(config)] if config else []), *(overrides or []),
                *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else []),
                *(["--resume-with-changes"] if resume_with_changes else [])]
        raise SystemExit(D.run_torchrun(gpus, args))  # torchrun's exit code (typer.Exit would be lost here)
    from loraforge.eval.validation import task_tools
    from loraforge.train.run import run_training

    if resume_with_changes and not resume:
        raise LoraforgeError("--resume-with-changes goes with --resume", hint="add --resume")
    result = run_training(cfg, resume=resume, overwrite=overwrite, with_changes=resume_with_changes,
                          profile=profile, tools=task_tools(cfg))
    if cfg.eval.test and D.launch_rank() != 0:
        return  # rank 0 alone evaluates
    if cfg.eval.test:  # the end-of-run evaluation and HTML report
        from loraforge.eval.run import evaluate_run

        evaluate_run(result.run_dir, log=lambda m: typer.echo(m, err=True))


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="A run folder (base + adapter) or a base model.")],
    prompt: Annotated[list[str], typer.Argument(help="One or more user messages; each is answered.")],
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 128,
    system: Annotated[Optional[str], typer.Option(help="System prompt (default: the run's).")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Answer only with a label of this set (one a line).")] = None,
    schema: Annotated[Optional[Path], typer.Option(help="Answer only with JSON satisfying this JSON Schema.")] = None,
) -> None:
    """Answer prompts with a fine-tuned run (or a bare base model), greedy decoding; --labels / --schema
    decode only valid answers (structured decoding, extra `structured`)."""
    from loraforge.data.templates import prompt_text
    from loraforge.eval.generate import build_messages, generate_answers, load_for_inference
    from loraforge.eval.structured import cli_structure
    from loraforge.serve.server import context_limit

    structure = cli_structure(labels, schema)  # a bad file is an error before the model loads
    handle = load_for_inference(model)
    tok, limit = handle.tokenizer, context_limit(handle.model)
    for i, p in enumerate(prompt, 1):  # as serve's 400 context_length_exceeded, before any decoding
        text = prompt_text(tok, build_messages(p, system or handle.system))
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n + max_new_tokens > limit:
            raise LoraforgeError(f"prompt {i} is {n:,} tokens; with --max-new-tokens {max_new_tokens} it needs "
                                 f"{n + max_new_tokens:,}, more than the model's context of {limit:,} tokens",
                                 hint="shorten the prompt or lower --max-new-tokens")
    answers = generate_answers(handle, prompt, system=system, max_new_tokens=max_new_tokens, structure=structure)
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

    handle = load_for_inference(model)
    typer.echo(f"chatting with {model}; an empty line or Ctrl-D ends the chat", err=True)
    chat_loop(handle, system=system, max_new_tokens=max_new_tokens)


@app.command()
def quickstart(
    output_dir: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/quickstart"),
    per_intent: Annotated[int, typer.Option(help="Training examples per intent (77 intents); 0 = all 10,003 but validation.")] = 10,
    test_size: Annotated[int, typer.Option(help="Test queries evaluated (seeded slice of the test set).")] = 300,
    val_per_intent: Annotated[int, typer.Option(help="Validation examples per intent, held out of training "
                                                     "(the best step is chosen by them).")] = 1,
    epochs: Annotated[float, typer.Option(help="Passes over the training examples.")] = 3,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
    regression: Annotated[bool, typer.Option(help="Score the general-prompt regression set before and after "
                                                  "(the forgetting guard).")] = True,
    overrides: Overrides = None,
) -> None:
    """The main job: fine-tune the embedded SmolLM2-135M-Instruct on BANKING77 and print before/after accuracy."""
    from loraforge.quickstart import run_quickstart

    run_quickstart(output_dir, per_intent=per_intent, test_size=test_size, epochs=epochs, overwrite=overwrite,
                   overrides=overrides or [], regression=regression, val_per_intent=val_per_intent)


@app.command()
def plan(
    config: Annotated[Optional[Path], typer.Argument(help="YAML run config; the flags below override it.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Family name, Hub id or folder with config.json.")] = None,
    method: Annotated[Optional[str], typer.Option(help="full | lora | qlora (default: from the config).")] = None,
    seq: Annotated[Optional[int], typer.Option(help="Sequence length in tokens.")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Examples per micro-batch.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step, over all GPUs.")] = None,
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank r.")] = None,
    targets: Annotated[Optional[str], typer.Option(help="Comma-separated LoRA modules, or all-linear.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(help="Recompute activations in backward.")] = None,
    optimizer: Annotated[Optional[str], typer.Option(
        help="auto (adamw_8bit for qlora, else adamw) | adamw | adamw_8bit | paged_adamw_8bit.")] = None,
    packing: Annotated[Optional[bool], typer.Option(help="Pack examples into full rows (no padding).")] = None,
    offload: Annotated[Optional[bool], typer.Option(help="Keep optimizer states in CPU RAM.")] = None,
    gpus: Annotated[Optional[int], typer.Option(help="Data-parallel GPUs (batch is per GPU).")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="ddp | fsdp: replicate or shard over the GPUs.")] = None,
    fast_path: Annotated[Optional[bool], typer.Option(help="The trainer's fused Llama-family path (default: on, "
                                                          "as model.fast_path auto on a GPU).")] = None,
    objective: Annotated[Optional[str], typer.Option(help="sft | dpo | orpo | simpo | kto | grpo (default: the "
                                                           "config's); --seq is one row: a pair's side.")] = None,
    num_generations: Annotated[Optional[int], typer.Option(help="grpo: completions per prompt, G.")] = None,
    completion_length: Annotated[Optional[int], typer.Option(help="grpo: longest completion in tokens.")] = None,
    prompt_length: Annotated[Optional[int], typer.Option(help="grpo: prompt tokens (seq = prompt + completion).")] \
        = None,
    reference: Annotated[Optional[bool], typer.Option(help="A no-grad reference forward (dpo/kto: on; grpo: "
                                                           "on with a KL term).")] = None,
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
        gpus=gpus, strategy=strategy, fast_path=fast_path, objective=objective, generations=num_generations,
        completion=completion_length, prompt_length=prompt_length, reference=reference,
    )
    report = plan_run(inputs, gpu=gpu, prices_file=prices)
    if json_out:
        typer.echo(report.to_json())
    else:
        from loraforge.plan.render import render

        render(report)


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (or a PEFT adapter folder).")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: RUN_DIR/merged).")] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16.")] = "bfloat16",
    base: Annotated[Optional[str], typer.Option(help="Base model (default: the run's base_model).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Fold the adapter into the base: a 16-bit safetensors folder with tokenizer and chat template."""
    from loraforge.export.merge import merge_run

    typer.echo(f"merged model written to {merge_run(run_dir, out, dtype=dtype, base=base, overwrite=overwrite)}")


export_app = typer.Typer(help="Export a run for other runtimes (GGUF for llama.cpp and Ollama).",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("gguf")
def export_gguf_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (or a PEFT adapter folder).")],
    quant: Annotated[str, typer.Option(help="f16 | q8_0 | q4_k_m (q4_k_m needs llama-cpp-python).")] = "q4_k_m",
    adapter_only: Annotated[bool, typer.Option(help="Base GGUF + GGUF LoRA instead of a merged model.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: RUN_DIR/gguf).")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base model (default: the run's base_model).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    imatrix: Annotated[bool, typer.Option(help="Calibrate q4_k_m with an importance matrix.")] = True,
) -> None:
    """Write the run as a GGUF file (with an Ollama Modelfile) for llama.cpp and Ollama."""
    from loraforge.export.pipeline import export_gguf

    res = export_gguf(run_dir, out, quant=quant, adapter_only=adapter_only, base=base, overwrite=overwrite,
                      use_imatrix=imatrix)
    for f in (res.model_file, res.adapter_file, res.modelfile):
        if f is not None:
            typer.echo(f"{f}  ({f.stat().st_size / 2**20:.1f} MiB)")
    typer.echo(f"done in {res.seconds:.1f} s; run it with: ollama create NAME -f {res.modelfile}")


@app.command()
def serve(
    base: Annotated[str, typer.Option("--base", help="Base model: folder, .gguf, Hub id or the embedded alias.")],
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", help="NAME=PATH of a PEFT adapter folder "
                                                         "(repeatable); requests pick it by `model`.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LORAFORGE_API_KEY",
                                                   help="Require `Authorization: Bearer KEY`.")] = None,
    max_batch: Annotated[int, typer.Option(help="Most requests decoded together.")] = 16,
    wait_ms: Annotated[float, typer.Option(help="On an idle server, how long the first request waits for others "
                                           "to start with (later ones join the running batch).")] = 5.0,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="Name of the bare base in `model` "
                                                      "(default: --base as given).")] = None,
) -> None:
    """OpenAI-compatible HTTP server; adapters load/unload at run time via /admin/adapters."""
    from loraforge.serve.server import serve as run_server

    pairs: dict[str, str] = {}
    for item in adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LoraforgeError(f"--adapter '{item}' is not NAME=PATH")
        if name in pairs:
            raise LoraforgeError(f"--adapter name '{name}' is given twice")
        pairs[name] = path
    run_server(base, pairs, host=host, port=port, api_key=api_key, max_batch=max_batch, wait_ms=wait_ms,
               name=model_name)


@app.command("eval")
def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (config.yaml + adapter/).")],
    test: Annotated[Optional[Path], typer.Option(help="Test file with reference answers (default: eval.test).")] = None,
    metric: Annotated[Optional[str], typer.Option(help="exact_match | normalized_match | accuracy | macro_f1 | "
                                                  "json_valid | json_schema | field_f1 | slot_f1 | regex | "
                                                  "rouge_l | bleu (default: eval.metric).")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Label set for accuracy/macro_f1, one label a line.")] = None,
    fewshot: Annotated[Optional[int], typer.Option(help="Training examples shown to the few-shot baseline.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N test examples.")] = None,
    no_base: Annotated[bool, typer.Option("--no-base", help="Skip the base and few-shot base models.")] = False,
    regression: Annotated[Optional[bool], typer.Option("--regression/--no-regression",
                                                       help="Score the general-prompt regression set "
                                                            "(default: eval.regression).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: RUN_DIR/eval).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Reuse the answers an interrupted evaluation already "
                                                          "streamed to results.jsonl (same run, same settings).")] = False,
    judge_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible base URL of an LLM judge "
                                                          "(default: eval.judge_url; none = no judge).")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="Model name for the judge endpoint.")] = None,
    reference: Annotated[Optional[str], typer.Option(help="A published result to show beside ours, e.g. "
                                                          "\"Casanueva et al. 2020: 93.0%\".")] = None,
    serve_as: Annotated[Optional[str], typer.Option(help="Also evaluate the adapter as served, comma-separated: "
                                                         "adapter, merged, gguf-f16, gguf-q8_0, gguf-q4_k_m, "
                                                         "nf4 (CUDA).")] = None,
    constrained: Annotated[Optional[str], typer.Option(help="auto | on | off: also evaluate the fine-tuned model "
                                                            "decoding only valid labels / schema-valid JSON "
                                                            "(default: eval.constrained).")] = None,
) -> None:
    """Base vs few-shot base vs fine-tuned on the test set: scores, paired tests, HTML report."""
    from loraforge.eval.run import evaluate_run

    result = evaluate_run(run_dir, test=test, metric=metric, labels=labels, fewshot=fewshot, limit=limit,
                          run_base=False if no_base else None, regression=regression, out=out, resume=resume,
                          judge_url=judge_url, judge_model=judge_model, reference=reference, serve_as=serve_as,
                          constrained=constrained, log=lambda m: typer.echo(m, err=True))
    for name, v in result.models.items():
        ok = v.details.get("valid_rate")
        typer.echo(f"{name:10s} {result.metric} = {v.value:.4f}  95% CI [{v.ci[0]:.4f}, {v.ci[1]:.4f}]"
                   + ("" if ok is None else f"  valid answers {ok:.1%}"))
    for name, c in result.comparisons.items():
        typer.echo(f"{name}: diff {c['diff']:+.4f}, p = {c['p_bootstrap']:.4g}")
    if result.judge and result.judge.get("pairwise"):
        pw = result.judge["pairwise"]
        typer.echo(f"judge: finetuned vs {pw['b']}: win {pw['win']:.0%} tie {pw['tie']:.0%} loss {pw['loss']:.0%} "
                   f"({pw['errors']} errors)")
    for kind, v in (result.variants or {}).items():
        typer.echo(f"served as {kind:12s} {result.metric} = {v.value:.4f}, same answers as adapter: "
                   f"{v.agreement:.0%}")
    typer.echo(f"overfitting: {result.overfit['status']}")
    folder = Path(out) if out else Path(run_dir) / "eval"
    typer.echo(f"report: {folder / 'report.html'}")
    for e in result.errors:
        typer.echo(f"error in {e.stage}: {e.error}", err=True)
    if result.errors:
        raise typer.Exit(1)


# each stage's commands that fill a file of their own register on `app` when imported
from loraforge.cli import data_cmds  # noqa: E402,F401  (loraforge data ...)
from loraforge.cli import runs_cmds  # noqa: E402,F401  (loraforge runs ...)
from loraforge.cli import synth_cmds  # noqa: E402,F401  (loraforge data synth)
from loraforge.cli import tune_cmds  # noqa: E402,F401  (loraforge tune)


STYLES = {0: "bold green", 2: "bold red", 3: "bold yellow"}


def allocator_defaults() -> None:
    """Expandable segments for the CUDA caching allocator, unless the user configured it: segments grow in
    place instead of the cache keeping blocks of every size it once needed, so peak reserved memory stays
    near the peak allocated (Unsloth and torchtune set the same). torch >= 2.10 reads PYTORCH_ALLOC_CONF (the
    older name warns that it is deprecated). Not on Windows or WSL, where expandable segments fail. Read when
    CUDA first allocates: set before any command touches the GPU; torchrun's workers inherit it."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    if any(k in os.environ for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")) or os.name == "nt" \
            or "microsoft" in platform.uname().release.lower():
        return
    try:
        major, minor = (int(x) for x in version("torch").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return
    os.environ["PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 10) else "PYTORCH_CUDA_ALLOC_CONF"] = \
        "expandable_segments:True"


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (see the module docstring)."""
    from rich.console import Console
    from rich.text import Text

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    allocator_defaults()
    try:
        code = app(args=argv, standalone_mode=False)
        if code == 130:  # click turns a KeyboardInterrupt (a second Ctrl-C) into this return value
            raise KeyboardInterrupt
    except LoraforgeError as e:
        from loraforge.train.distributed import record_exit_code

        code, speak = record_exit_code(e.exit_code)  # under `--gpus N`, for the launcher (torchrun's own code is 1)
        if speak:
            err.print(Text(f"{e.label}: ", style=STYLES.get(e.exit_code, "bold")) + Text(str(e)))
        return code
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        return int(code or 0)
    except KeyboardInterrupt:
        err.print("quit: interrupted without saving")
        return 130
    except Exception as e:  # usage errors (typer's click exceptions) arrive here in non-standalone mode
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            return int(e.exit_code)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
