"""The run config: one YAML file validated by typed schemas, plus `key=value` overrides.

    from loraforge.config import load_config
    cfg = load_config("run.yaml", ["train.learning_rate=1e-3", "lora.r=32"])

Every field has a default that follows current practice (LoRA r = alpha = 16 on all linear layers,
lr 2e-4, warmup 5%, weight decay 0.01, batch 2 x accumulation 8, 3 epochs, seq 2048, seed 3407).
An unknown key, a wrong type or an impossible value raises one `LoraforgeError` that names the key
and the allowed values. This module imports no torch, so `--help` and validation stay instant.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraforge.errors import LoraforgeError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBEDDED_MODEL = "smollm2-135m-instruct"
HOST_EMBEDDING_MIN_BYTES = 256 * 2 ** 20   # model.host_embedding auto: QLoRA input tables of this size or more
AUTO_EVERY_MIN, AUTO_EVERY_MAX = 50, 500   # train.eval_every / save_every auto: steps between validations


def auto_every(total_steps: int) -> int:
    """Steps between validations (and checkpoints) under train.eval_every / save_every auto: a tenth of the run,
    AUTO_EVERY_MIN to AUTO_EVERY_MAX."""
    return min(AUTO_EVERY_MAX, max(AUTO_EVERY_MIN, -(-total_steps // 10)))


# Names other tools use for our keys, so an error can point at the right one.
ALIASES = {"lr": "learning_rate", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
           "num_epochs": "epochs", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
           "micro_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
           "max_seq_len": "max_seq_length", "sequence_len": "max_seq_length", "target": "target_modules"}


def _on_off(value):
    """YAML 1.1 reads a bare on/off (yes/no) as a boolean: `fast_path: off` means the word, not False."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# an auto / on / off setting, written bare in YAML or as a key=value override
Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """How the base model is loaded."""

    quantization: Literal["none", "nf4"] = Field("none", description="'nf4' = QLoRA (bitsandbytes, CUDA).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Storage dtype of the frozen base: auto = bf16 on GPU, fp32 on CPU."
    )
    gradient_checkpointing: bool | Literal["offload"] = Field(
        False, description="Recompute activations in backward; 'offload' also parks each layer's input in "
                           "pinned CPU memory (fast path, CUDA)."
    )
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    fast_path: Switch = Field(
        "auto", description="loraforge's fused Llama-family forward: auto = on CUDA for Llama/Mistral/Qwen, "
                            "on = also on CPU, off = PEFT's own forward."
    )
    cuda_graphs: Switch = Field(
        "auto", description="Fast path with gradient checkpointing on one GPU: replay the decoder stack as CUDA "
                            "graphs once a batch shape repeats (batches padded to a few lengths, packed rows too). "
                            "auto = where the host limits the step (small models: 1.4x for a 1B model on an H100), "
                            "on = wherever they apply."
    )
    host_embedding: Switch = Field(
        "auto", description="Keep the frozen input embedding in host memory and copy each batch's rows over "
                            "(model.host_embedding): auto = for a QLoRA model on a GPU whose untied table is 256 "
                            "MiB or more (Llama-3.1-8B: 0.98 GiB less GPU memory); on = any untied frozen table."
    )
    mlp_chunk_tokens: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="Fast path with gradient checkpointing: run each layer's MLP over this many tokens at a "
                            "time (its gate/up buffers then exist for one chunk: long inputs). auto = chunks of "
                            "8,192 tokens for batches of more than 16,384 tokens; 0 = never."
    )
    checkpoint_every: int = Field(
        1, ge=1, le=64, description="Fast path with gradient checkpointing: keep (or offload) the input of every "
                                   "n-th layer only, n layers recomputed together: 1/n of that memory (host memory "
                                   "with offload: 8 KB a token and layer at 8B) for one more forward of n - 1 layers."
    )


class DataSection(_Section):
    """Where the examples come from and how they become token ids."""

    train: str | None = Field(None, description="Training file (JSONL/JSON/CSV): messages, Alpaca or columns.")
    validation: str | None = Field(None, description="Validation file; if unset, split from `train`.")
    format: Literal["auto", "messages", "alpaca", "sharegpt", "text", "columns"] = "auto"
    prompt_column: str | None = Field(None, description="For `columns` format: the user turn's column.")
    response_column: str | None = Field(None, description="For `columns` format: the assistant turn's column.")
    system_prompt: str | None = Field(None, description="System turn added to every example that has none.")
    validation_split: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction held out when no validation file.")
    max_seq_length: int = Field(2048, ge=8, le=1_048_576)
    train_on: Literal["assistant", "all"] = Field("assistant", description="Which tokens carry loss.")
    packing: bool = Field(False, description="Pack training examples into rows of max_seq_length tokens; each "
                                             "example attends only to itself (no padding between them).")
    share_prefix: Switch = Field(
        "auto", description="A batch whose examples open with the same tokens (a fixed system prompt) runs as one "
                            "row holding them once; same loss. auto = on the CPU (the quickstart's step 0.68x), "
                            "on = also on GPUs (no CUDA graphs for those batches: a 135M run 3.6x slower on an "
                            "H100), off = never."
    )


class LoraSection(_Section):
    """The adapter attached to the frozen base."""

    adapter: Literal["lora", "dora"] = "lora"
    r: int = Field(16, ge=1, le=4096)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR), min_length=1)


class TrainSection(_Section):
    """The optimisation schedule and bookkeeping of one run."""

    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(2, ge=1, description="Examples per device per micro-batch.")
    grad_accum: int = Field(8, ge=1, description="Micro-batches per optimizer step, in all: several processes "
                                                 "share them, so the run's batch does not change with --gpus.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm; null = off.")
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "auto", description="auto = adamw_8bit for a QLoRA model (model.quantization nf4: bitsandbytes is there "
                            "already; 8B: 0.23 GiB less GPU memory), else adamw (fused on a GPU).")
    eval_every: int | Literal["auto"] = Field(
        "auto", description="Validation loss every N optimizer steps; auto = about ten validations a run, 50 to 500 "
                            "steps apart (TrainSection.intervals).")
    save_every: int | Literal["auto"] = Field(
        "auto", description="Checkpoint every N optimizer steps (and on SIGTERM/SIGINT); auto = eval_every's "
                            "auto spacing.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    log_every: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Compute precision: auto = bf16 where the device has it (GPUs, CPUs with bf16 units), "
                            "fp16 with loss scaling on GPUs without (T4, V100), else fp32."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; default: all cores.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Several processes (torchrun / --gpus N): ddp = a full model copy per GPU, "
                           "fsdp = FSDP2 shards the frozen base per decoder layer (for bases too large for one GPU).")
    dist_timeout_s: float = Field(600, gt=0, description="Seconds a process waits for the others (a dead or stuck "
                                                          "rank stops the run after this long).")
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        default_factory=list, description="Trackers that get every metrics row, the config and the eval scores "
                                          "(extra `track`): tensorboard, mlflow, wandb (offline), trackio.")
    report_project: str = Field("loraforge", description="W&B / Trackio project and MLflow experiment of the run.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                                       "sqlite:///.../mlflow.db beside the run folder).")
    select_by: Literal["last", "loss", "metric"] = Field(
        "last", description="Which step's weights become adapter/: the last, the lowest validation loss, or the "
                            "best eval.metric on a validation slice generated at each eval_every (the last step's "
                            "checkpoint stays in checkpoints/).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without improvement of select_by "
                                "(metric, else validation loss); null = never.")
    validate_limit: int = Field(200, ge=1, description="Validation examples generated for select_by=metric.")
    replay: float = Field(0.0, ge=0.0, le=0.5, description="Share of the training set made of general chat: the "
                                                            "base model's own answers to a shipped instruction set "
                                                            "(self-distillation against forgetting).")

    @field_validator("eval_every", "save_every")
    @classmethod
    def _positive_every(cls, v):
        # one message for both members of the union (pydantic's own ge=1 would report each member's failure)
        if v != "auto" and v < 1:
            raise ValueError("must be a whole number of steps, 1 or more, or auto")
        return v

    def intervals(self, total_steps: int) -> tuple[int, int]:
        """(eval_every, save_every) for a run of `total_steps` optimizer steps. auto: a tenth of the run,
        at least AUTO_EVERY_MIN and at most AUTO_EVERY_MAX steps apart. The old fixed 50 gave the 135M
        BANKING77 run (1,863 steps) 37 validations and 37 checkpoints: `loraforge train` ran it at 34,363
        tokens/s so and 38,409 with auto, the same final validation loss, in one H100 call (`bench/train_e2e.py
        --tools loraforge`, then `loraforge-eval50-save50`: bench/results/train_e2e/s20/h100_call1_135m_banking77_3ep*).
        Peers default to none (TRL, Unsloth's notebooks) or every 500 steps (transformers' save_steps). A stop
        signal still saves at once."""
        auto = auto_every(total_steps)
        return (auto if self.eval_every == "auto" else self.eval_every,
                auto if self.save_every == "auto" else self.save_every)


class EvalSection(_Section):
    """Generation-based evaluation on held-out prompts (the quickstart uses exact match)."""

    test: str | None = Field(None, description="File of prompts with reference answers.")
    max_new_tokens: int = Field(32, ge=1, le=32768)
    batch_size: int = Field(32, ge=1)
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N test examples.")
    run_base: bool = Field(True, description="Also evaluate the base model for comparison.")
    metric: Literal["exact_match", "normalized_match", "accuracy", "macro_f1", "json_valid", "json_schema",
                    "field_f1", "regex", "rouge_l", "bleu", "slot_f1"] = Field(
        "exact_match", description="How answers are scored (loraforge.eval.metrics).")
    labels: str | None = Field(None, description="Label set for accuracy/macro_f1: a file, one label a line "
                                                 "(or a JSON list).")
    schema_file: str | None = Field(None, description="JSON Schema file for metric json_schema.")
    pattern: str | None = Field(None, description="Regular expression for metric regex.")
    fewshot: int = Field(3, ge=0, description="Training examples shown to the few-shot base baseline (0: none).")
    fewshot_system: str | None = Field(None, description="System prompt of the few-shot baseline "
                                                         "(default: data.system_prompt).")
    regression: bool = Field(True, description="Also score base and fine-tuned on the general-prompt set.")
    judge_url: str | None = Field(None, description="OpenAI-compatible base URL of an LLM judge (None: no judge).")
    judge_model: str = Field("judge", description="Model name sent to the judge endpoint.")
    judge_api_key_env: str | None = Field(None, description="Name of the env var holding the judge's API key.")
    judge_mode: Literal["rubric", "pairwise", "both"] = Field("both", description="Rubric scores, fine-tuned vs "
                                                                                  "base A/B, or both.")
    judge_timeout: float = Field(60.0, gt=0, description="Seconds to wait for one judge reply.")
    reference: str | None = Field(None, description="A published result shown beside ours, e.g. 'Paper X: 93.0%'.")
    serve_as: list[str] = Field(default_factory=list, description="Also evaluate the adapter as served: adapter, "
                                                                   "merged, gguf-f16, gguf-q8_0, gguf-q4_k_m, nf4.")
    constrained: Switch = Field(
        "auto", description="Structured decoding (llguidance, extra `structured`): the fine-tuned model is also "
                            "evaluated decoding only valid answers: a label of eval.labels, or JSON matching "
                            "eval.schema_file (any JSON object for json_valid/field_f1/slot_f1 without one). "
                            "auto: on where the task has such a structure and llguidance is installed.")

    @field_validator("constrained", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):  # YAML reads a bare on / off as true / false
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class PreferenceSection(_Section):
    """Preference tuning (objective dpo | orpo | simpo | kto): the loss's constants and the pairs' shape."""

    beta: float | None = Field(None, gt=0, description="Strength of the preference term; null = the objective's "
                                                       "usual value (dpo/kto 0.1, orpo's lambda 0.1, simpo 2.0).")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="DPO's loss: sigmoid (the paper's) or ipo.")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin.")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of desirable completions.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of undesirable completions.")
    max_prompt_length: int = Field(1024, ge=1, description="Prompts longer than this many tokens keep their "
                                                           "last tokens (counted in data_report.json).")
    reference: Literal["cached", "live"] = Field(
        "cached", description="dpo/kto reference log-probs (the base, adapter off): cached = computed once per "
                              "example before training, live = in every step.")


class GrpoSection(_Section):
    """GRPO with verifiable rewards: G sampled completions per prompt, scored by reward functions."""

    rewards: list[str] = Field(default_factory=lambda: ["exact_match"], min_length=1, description=(
        "Reward functions, summed: exact_match, normalized_match, numeric, regex (eval.pattern), json_schema "
        "(eval.schema_file), or FILE.py / FILE.py:NAME defining reward(prompt, completion, **row) -> float."))
    group_size: int = Field(8, ge=2, description="Completions sampled per prompt (G).")
    max_new_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    kl_beta: float = Field(0.0, ge=0, description="Weight of the KL to the reference (adapter off); 0 = no KL.")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clipping of the probability ratio.")
    pass_threshold: float = Field(1.0, description="A completion passes when its reward reaches this.")


class RunConfig(_Section):
    """A whole run: what to fine-tune, on what data, how, and where the results go."""

    base_model: str = Field(EMBEDDED_MODEL, description="Local HF folder, Hub id, .gguf file or an alias.")
    output_dir: str = Field("runs/run", description="Run folder: checkpoints, adapter, metrics, config.")
    seed: int = 3407
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    objective: Literal["sft", "dpo", "orpo", "simpo", "kto", "grpo"] = Field(
        "sft", description="sft = supervised; dpo/orpo/simpo on {prompt, chosen, rejected} pairs; kto on "
                           "{prompt, completion, label}; grpo on prompts with reward functions.")
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    grpo: GrpoSection = Field(default_factory=GrpoSection)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.data.format == "columns" and not (self.data.prompt_column and self.data.response_column):
            raise ValueError("data.format 'columns' needs data.prompt_column and data.response_column")
        if self.objective != "sft" and self.data.packing:
            raise ValueError(f"data.packing is for objective sft only (objective is {self.objective})")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _fields_at(path: tuple, root: type[BaseModel] | None = None) -> list[str]:
    model: type[BaseModel] = root or RunConfig
    for part in path:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _explain(err: ValidationError, source: str, root: type[BaseModel] | None = None) -> LoraforgeError:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(x) for x in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(loc[:-1], root)
            alias = ALIASES.get(str(loc[-1]))
            close = [alias] if alias in allowed else difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            maybe = f" Did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            lines.append(f"unknown key '{key}'.{maybe} Allowed here: {', '.join(allowed)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"'{key}': {msg}{shown}")
    return LoraforgeError("invalid config:\n  " + "\n  ".join(lines), where=source)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise LoraforgeError(f"cannot set '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict:
    """Turn ["train.learning_rate=1e-3", "lora.target_modules=[q_proj,v_proj]"] into a nested dict."""
    tree: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise LoraforgeError(f"override '{pair}' is not key=value", hint="write e.g. train.learning_rate=1e-3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise LoraforgeError("config file not found", where=str(p), hint="check the path, or run without a config")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise LoraforgeError(f"not valid YAML: {getattr(e, 'problem', e)}", where=where) from None
    if not isinstance(tree, dict):
        raise LoraforgeError("the config must be a mapping of keys to values", where=str(p))
    return tree


def build_config(tree: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, source) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> RunConfig:
    """Defaults <- `base` <- YAML file <- key=value overrides, validated once at the end."""
    tree = dict(base or {})
    source = "overrides"
    if path is not None:
        tree = _merge(tree, read_yaml(path))
        source = str(path)
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
    return build_config(tree, source)


def resolve_optimizer(name: str, quantized: bool, sharded: bool = False, device: str = "cuda") -> str:
    """train.optimizer with auto resolved: 8-bit AdamW for a quantized model on one GPU or under DDP (QLoRA runs
    are the ones sized to the GPU's memory; QLoRA's own recipe and the peers' notebooks use 8-bit or paged
    states), else AdamW: bitsandbytes' optimizers take no FSDP2-sharded (DTensor) parameters, and a CPU run
    has no memory to save. The planner resolves it the same way (plan.memory.TrainSetup.optimizer_name)."""
    if name != "auto":
        return name
    return "adamw_8bit" if quantized and not sharded and device == "cuda" else "adamw"


def optimizer_of(cfg: "RunConfig", sharded: bool = False, device: str = "cuda") -> str:
    return resolve_optimizer(cfg.train.optimizer, cfg.model.quantization == "nf4", sharded, device)


def host_embedding_refusal(setting: str, *, on_gpu: bool, sharded: bool, frozen: bool, tied: bool, quantized: bool,
                           table_bytes: int) -> str | None:
    """None when model.host_embedding = `setting` keeps the input embedding in host memory, else why not. The
    trainer (model.host_embedding.why_not_host, from the live model) and the planner
    (plan.memory.TrainSetup.host_table, from the model's shape) both decide by it."""
    if setting == "off":
        return "model.host_embedding is off"
    if not on_gpu:
        return "the model is not on a GPU"
    if sharded:
        return "FSDP shards the embedding already"
    if not frozen:
        return "the input embedding is trained (lora.modules_to_save) or not a plain embedding"
    if tied:
        return "the input embedding is tied to the output head, which needs it on the GPU"
    if setting == "auto" and not (quantized and table_bytes >= HOST_EMBEDDING_MIN_BYTES):
        return f"auto moves only a QLoRA model's table of {HOST_EMBEDDING_MIN_BYTES >> 20} MiB or more"
    return None
