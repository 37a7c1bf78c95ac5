"""An Ollama `Modelfile` for an exported GGUF: the chat template in Ollama's Go syntax, and stop tokens.

    text = modelfile_text("model-q4_k_m.gguf", tokenizer, system="You are ...")
    # then: ollama create my-model -f Modelfile && ollama run my-model

The Jinja chat template is not translated; it is recognised. Each known format (ChatML, Llama 3,
Mistral [INST]) renders probe conversations in Python, and the format whose renderings equal the
Jinja template's is used; a default system prompt that the template inserts becomes SYSTEM. When no
format matches, TEMPLATE is left out (Ollama then falls back to the chat template inside the GGUF) and
the stop token is still written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraforge.export.vocab import end_of_turn
from loraforge.files import atomic_write_text


@dataclass(frozen=True)
class ChatFormat:
    name: str
    turn: str                 # one message, with {role} and {content}
    generation: str           # what opens the assistant's answer
    stops: tuple[str, ...]
    go_template: str          # the same format for Ollama
    prefix: str = ""          # text before the first turn (e.g. the bos token)
    system_ok: bool = True

    def render(self, messages: list[dict], add_generation_prompt: bool = True, bos: str = "") -> str:
        text = self.prefix.format(bos=bos) + "".join(
            self.turn.format(role=m["role"], content=m["content"]) if "{role}" in self.turn
            else _mistral_turn(m) for m in messages)
        return text + (self.generation if add_generation_prompt else "")


def _mistral_turn(m: dict) -> str:
    return f"[INST] {m['content']} [/INST]" if m["role"] == "user" else f"{m['content']}</s>"


FORMATS = (
    ChatFormat("chatml", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", ("<|im_end|>",),
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n"),
    ChatFormat("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>",),
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n", prefix="{bos}"),
    ChatFormat("mistral", "", "", ("</s>", "[INST]"),
               '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
               '{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{- end }}{{- end }}',
               prefix="{bos}", system_ok=False),
)
PROBES = (
    [{"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
)


def _jinja(tokenizer, messages) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template may raise anything for a conversation it rejects
        return None


def _default_system(fmt: ChatFormat, tokenizer, bos: str) -> tuple[bool, str | None]:
    """(matches, default system prompt the template inserts when none is given)."""
    for probe in PROBES:
        if probe[0]["role"] == "system" and not fmt.system_ok:
            continue
        want = _jinja(tokenizer, probe)
        if want is None or want == fmt.render(probe, bos=bos):
            continue
        if probe[0]["role"] == "system" or "{role}" not in fmt.turn:
            return False, None
        head = fmt.prefix.format(bos=bos) + fmt.turn.split("{content}")[0].format(role="system")
        tail = fmt.turn.split("{content}")[1].format(role="system")
        if not want.startswith(head) or tail not in want[len(head):]:
            return False, None
        system = want[len(head):want.index(tail, len(head))]
        if want != fmt.render([{"role": "system", "content": system}, *probe], bos=bos):
            return False, None
        return True, system
    return True, None


def detect_format(tokenizer) -> tuple[ChatFormat | None, str | None]:
    """The known format this tokenizer's chat template renders exactly, and its default system prompt."""
    if not tokenizer.chat_template:
        return None, None
    bos = tokenizer.bos_token or ""
    if _jinja(tokenizer, PROBES[0]) is None:
        return None, None
    for fmt in FORMATS:
        ok, system = _default_system(fmt, tokenizer, bos)
        if ok:
            return fmt, system
    return None, None


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile_text(model_file: str, tokenizer, *, system: str | None = None, adapter_file: str | None = None,
                   header: str = "") -> str:
    fmt, default_system = detect_format(tokenizer)
    stops = list(fmt.stops) if fmt else []
    eot = end_of_turn(tokenizer)
    if eot and eot not in stops:
        stops.insert(0, eot)
    lines = [f"# {line}" for line in header.splitlines()]
    lines.append(f"FROM {model_file}")
    if adapter_file:
        lines.append(f"ADAPTER {adapter_file}")
    if fmt:
        lines.append(f"TEMPLATE {_quote(fmt.go_template)}")
    else:
        lines.append("# chat template not recognised: Ollama uses the one stored in the GGUF file")
    if system or default_system:
        lines.append(f"SYSTEM {_quote(system or default_system)}")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(path: str | Path, model_file: str, tokenizer, **kw) -> Path:
    path = Path(path)
    return atomic_write_text(path, modelfile_text(model_file, tokenizer, **kw))
