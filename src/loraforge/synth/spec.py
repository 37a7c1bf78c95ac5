"""The synth spec: what to generate, from which endpoint, and how to verify it (typed, YAML).

    spec = load_spec("synth.yaml")          # LoraforgeError naming the key on any mistake

The spec hash (`generation_hash`) covers only what changes the requests (endpoint model, task,
seeds, format, mode, diversity plan, sampling); the journal keys requests by it and the request's
index, so raising `count`, changing verification or concurrency, or resuming a killed run reuses
every answer already received, while changing the task starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from loraforge.config import _explain, read_yaml
from loraforge.errors import LoraforgeError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Endpoint(_Section):
    """An OpenAI-compatible chat endpoint: a frontier API, vLLM, Ollama, llama.cpp, `loraforge serve`."""

    base_url: str
    model: str
    api_key_env: str | None = None         # the NAME of an environment variable holding the key
    concurrency: int = Field(16, ge=1, le=1024)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0, le=50)
    backoff_s: float = Field(0.5, ge=0)     # first retry waits up to this (full jitter), doubling each time
    max_backoff_s: float = Field(30.0, ge=0)
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    stop: list[str] | None = None           # stop strings sent with every request, e.g. ["\n"] for one-line messages
    stream: bool = False                    # server-sent events; a stream cut short is retried
    send_seed: bool = True                  # send `seed` (index-derived) with every request
    price_per_1m_input: float = Field(0.0, ge=0)   # USD, for the cost counter
    price_per_1m_output: float = Field(0.0, ge=0)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, e.g. http://localhost:8000/v1")
        return v

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise LoraforgeError(f"endpoint.api_key_env names ${self.api_key_env}, which is not set",
                                 hint=f"export {self.api_key_env}=... (or set endpoint.api_key_env: null)")
        return key


class Generated(_Section):
    """Ask the model for the list first: `{generate: 20}` topics, written by the endpoint."""

    generate: int = Field(ge=1, le=1000)


class Diversity(_Section):
    """The plan each request draws from: topics cycle (coverage), persona and difficulty are drawn."""

    topics: list[str] | Generated | None = None
    topics_file: str | None = None            # a JSON list, or one topic a line (added to `topics`)
    personas: list[str] | Generated | None = None
    difficulty: list[str] | None = None

    def topic_list(self) -> list[str]:
        """The listed topics: `topics` (when a list), then `topics_file`'s."""
        out = list(self.topics) if isinstance(self.topics, list) else []
        if self.topics_file:
            text = Path(self.topics_file).read_text(encoding="utf-8")
            try:
                items = json.loads(text)
            except ValueError:
                items = text.splitlines()
            if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
                raise LoraforgeError("diversity.topics_file must be a JSON list of strings or one topic a line",
                                     where=self.topics_file)
            out += [t.strip() for t in items if t.strip()]
        return out


class SeedExample(_Section):
    user: str
    assistant: str | dict | list


class OutputFormat(_Section):
    format: Literal["chat", "json"] = "chat"
    json_schema: dict | None = None          # format: json — the answer must satisfy it
    response_format: bool = False             # also send OpenAI's response_format json_schema
    system_prompt: str | None = None          # system turn of every output record

    @model_validator(mode="after")
    def _schema(self) -> OutputFormat:
        if self.format == "json" and self.json_schema is None:
            raise ValueError("output.format 'json' needs output.json_schema (a JSON Schema the answer satisfies)")
        if self.json_schema is not None:
            try:
                import jsonschema
            except ImportError:
                raise ValueError("output.json_schema needs jsonschema: pip install 'loraforge[synth]'") from None
            try:
                jsonschema.validators.validator_for(self.json_schema).check_schema(self.json_schema)
            except jsonschema.SchemaError as e:
                raise ValueError(f"output.json_schema is not a valid JSON Schema: {e.message}") from None
        return self


class Judge(_Section):
    """An LLM judge (loraforge.eval.llm_judge) scores each kept example 1-10; below `threshold` is rejected."""

    base_url: str
    model: str
    api_key_env: str | None = None
    threshold: float = Field(6.0, ge=1, le=10)
    rubric: str | None = None
    concurrency: int = Field(4, ge=1, le=256)
    timeout_s: float = Field(120.0, gt=0)


class Verify(_Section):
    enabled: bool = True
    train: list[str] = []                     # the user's files: near-copies of them are rejected
    test: list[str] = []                      # held-out files: near-copies are contamination
    dedup: bool = True                        # exact + MinHash within the set
    compare: Literal["prompt", "example"] = "prompt"   # what dedup/contamination compare
    near_threshold: float = Field(0.8, gt=0, le=1)
    contamination_threshold: float = Field(0.7, gt=0, le=1)
    semantic: bool = False                    # embeddings (the `semantic` extra)
    semantic_threshold: float = Field(0.92, ge=-1, le=1)
    min_chars: int = Field(1, ge=0)           # of the answer
    max_chars: int = Field(20000, ge=1)
    min_prompt_chars: int = Field(3, ge=0)
    refusals: bool = True
    refusal_patterns: list[str] = []          # regexes added to the built-in ones
    judge: Judge | None = None

    @field_validator("train", "test", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class Spec(_Section):
    endpoint: Endpoint
    task: str = Field(min_length=1)
    mode: Literal["generate", "distill", "rewrite"] = "generate"
    count: int | None = Field(None, ge=1)     # generate: examples (default 100); distill/rewrite: at most (all)
    seed: int = 0
    answer: Literal["model", "topic"] = "model"   # generate: topic = the label (classification data)
    seed_examples: list[SeedExample] = []
    seed_file: str | None = None              # any format `data validate` reads
    prompts: list[str] = []                   # distill: the prompts to answer
    prompts_file: str | None = None           # distill: a file of records (their user turns) or one a line
    rewrite_file: str | None = None           # rewrite: examples to rewrite
    rewrites_per_example: int = Field(1, ge=1, le=100)
    keep_answer: bool = True                  # rewrite: keep the original answer (else re-answer)
    output: OutputFormat = OutputFormat()
    diversity: Diversity = Diversity()
    verify: Verify = Verify()
    journal: str | None = None                # default: OUT.journal.jsonl
    _hash: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _mode_inputs(self) -> Spec:
        if self.mode == "distill" and not (self.prompts or self.prompts_file):
            raise ValueError("mode 'distill' needs prompts (a list) or prompts_file")
        if self.mode == "rewrite" and not self.rewrite_file:
            raise ValueError("mode 'rewrite' needs rewrite_file (the examples to rewrite)")
        if self.answer == "topic" and (self.mode != "generate" or not (self.diversity.topics or
                                                                      self.diversity.topics_file)):
            raise ValueError("answer 'topic' needs mode 'generate' and diversity.topics or topics_file (the labels)")
        if self.output.format == "json" and self.answer == "topic":
            raise ValueError("answer 'topic' writes the topic as the answer; it cannot be output.format 'json'")
        return self

    def generation_hash(self) -> str:
        """Hash of everything that shapes a request (not count, verification or client settings)."""
        if self._hash is None:
            self._hash = self._generation_hash()
        return self._hash

    def _generation_hash(self) -> str:
        e = self.endpoint
        keyed = {"model": e.model, "temperature": e.temperature, "top_p": e.top_p, "max_tokens": e.max_tokens,
                 "stop": e.stop,
                 "send_seed": e.send_seed, **self.model_dump(include={
                     "task", "mode", "seed", "answer", "seed_examples", "seed_file", "prompts", "prompts_file",
                     "rewrite_file", "rewrites_per_example", "keep_answer", "output", "diversity"})}
        files = {n: getattr(self, n) for n in ("seed_file", "prompts_file", "rewrite_file")}
        files["topics_file"] = self.diversity.topics_file
        for name, f in files.items():  # their content shapes requests too
            if f and Path(f).is_file():
                keyed[name + "_sha256"] = hashlib.sha256(Path(f).read_bytes()).hexdigest()
        return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_spec(tree: dict, source: str = "spec") -> Spec:
    try:
        return Spec.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, source, Spec) from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file. File paths in it are relative to the working directory, as in a run
    config (run from the folder the paths start at)."""
    p = Path(path)
    spec = build_spec(read_yaml(p), str(p))
    for name in ("seed_file", "prompts_file", "rewrite_file"):
        f = getattr(spec, name)
        if f and not Path(f).is_file():
            raise LoraforgeError(f"'{name}' file not found: {f}", where=str(p))
    for f in [*spec.verify.train, *spec.verify.test]:
        if not Path(f).is_file():
            raise LoraforgeError(f"'verify' file not found: {f}", where=str(p))
    if spec.diversity.topics_file and not Path(spec.diversity.topics_file).is_file():
        raise LoraforgeError(f"'diversity.topics_file' not found: {spec.diversity.topics_file}", where=str(p))
    return spec
