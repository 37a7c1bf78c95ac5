"""One base model in memory with any number of named PEFT LoRA adapters, loaded and unloaded at run time.

`Registry.lock` guards the model: the batching worker holds it for each decode step, and loading or
unloading an adapter takes it too, so an adapter never changes under a running step. `Registry.gate`
keeps the worker from starving an admin call: a load/unload holds the gate while it waits for the lock,
and the worker passes the gate before each step (`Registry.step()`), so the change lands after the
step in flight. A failed load (missing folder, adapter made for another base) leaves no half-injected
adapter behind. Refusals are typed (serve/errors.py): AdapterLoadFailed, AdapterAlreadyLoaded, AdapterNotFound.
"""

from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from pathlib import Path

from safetensors import safe_open

from loraforge.model.adapters import peft_wrapping
from loraforge.serve.errors import AdapterAlreadyLoaded, AdapterLoadFailed, AdapterNotFound

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
OTHER_BASE = "load it over the base model it was trained on"


class Registry:
    def __init__(self, model, tokenizer, base_name: str):
        self.model = model            # the bare base until the first adapter, then a PeftModel
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.adapters: dict[str, str] = {}  # name -> folder
        self.serials: dict[str, int] = {}   # name -> which load this is (a reload under the same name differs)
        self._loads = 0
        self.lock = threading.RLock()
        self.gate = threading.Lock()

    @contextmanager
    def step(self):
        """The worker's hold on the model for one step; an admin call waiting at the gate goes first."""
        with self.gate:
            pass
        with self.lock:
            yield self.model

    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def knows(self, name: str) -> bool:
        return name == self.base_name or name in self.adapters

    def adapter_for(self, model_name: str) -> str:
        return BASE if model_name == self.base_name else model_name

    def serial(self, name: str) -> int | None:
        """A number that changes whenever `name` is loaded again; None when it is not loaded."""
        return self.serials.get(name)

    def load(self, name: str, path: str | Path) -> None:
        from peft import PeftModel  # lazy, as everywhere in serve/: see server.py's note on torch and peft

        path = Path(path)
        if not name or name == self.base_name or name == BASE or "/" in name:
            raise AdapterLoadFailed(f"'{name}' cannot be an adapter name", hint="pick a short name without '/'")
        if name in self.adapters:
            raise AdapterAlreadyLoaded(f"an adapter named '{name}' is already loaded", hint="unload it first")
        if not (path / "adapter_config.json").is_file():
            raise AdapterLoadFailed("no adapter_config.json here: not a PEFT adapter folder", where=str(path))
        try:
            json.loads((path / "adapter_config.json").read_text())
        except ValueError as e:
            raise AdapterLoadFailed(f"adapter_config.json is not valid JSON: {e}", where=str(path)) from None
        with self.gate, self.lock:
            if name in self.adapters:  # checked again: another load may have won the race
                raise AdapterAlreadyLoaded(f"an adapter named '{name}' is already loaded", hint="unload it first")
            check_shapes(self.model, path)
            try:
                with peft_wrapping():
                    if isinstance(self.model, PeftModel):
                        self.model.load_adapter(str(path), adapter_name=name)
                    else:
                        self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            except (RuntimeError, ValueError, KeyError, OSError) as e:  # shape mismatch: another base
                self._drop(name)
                raise AdapterLoadFailed(f"this adapter does not fit the base model: {str(e).splitlines()[0][:300]}",
                                        where=str(path), hint=OTHER_BASE) from None
            self.model.eval()
            self.adapters[name] = str(path)
            self._loads += 1
            self.serials[name] = self._loads

    def unload(self, name: str) -> None:
        with self.gate, self.lock:
            if name not in self.adapters:
                raise AdapterNotFound(f"no adapter named '{name}' is loaded")
            self._drop(name)
            del self.adapters[name]
            del self.serials[name]

    def _drop(self, name: str) -> None:
        from peft import PeftModel

        if not isinstance(self.model, PeftModel) or name not in self.model.peft_config:
            return
        others = [n for n in self.model.peft_config if n != name]
        if not others:  # the last adapter: go back to the bare base (PEFT keeps no empty wrapper)
            self.model = self.model.unload()
            self.model.eval()
            return
        if self.model.active_adapter == name:
            self.model.set_adapter(others[0])
        self.model.delete_adapter(name)


def check_shapes(model, path: Path) -> None:
    """Refuse an adapter whose LoRA matrices do not fit this base's layers, before touching the model."""
    from peft import PeftModel

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterLoadFailed("no adapter_model.safetensors here", where=str(path))
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    try:
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                m = re.match(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
                if not m:
                    continue
                try:
                    mod = base.get_submodule(m.group(1))
                except AttributeError:
                    raise AdapterLoadFailed(f"this adapter targets '{m.group(1)}', which this base model lacks",
                                            where=str(path), hint=OTHER_BASE) from None
                mod = getattr(mod, "base_layer", mod)
                shape = f.get_slice(key).get_shape()
                want = getattr(mod, "in_features", None) if m.group(2) == "A" else getattr(mod, "out_features", None)
                got = shape[1] if m.group(2) == "A" else shape[0]
                if want is not None and got != want:
                    raise AdapterLoadFailed(f"this adapter does not fit the base model: {key} has shape {list(shape)} "
                                            f"but the layer has {want} {'inputs' if m.group(2) == 'A' else 'outputs'}",
                                            where=str(path), hint=OTHER_BASE)
    except (OSError, ValueError) as e:
        raise AdapterLoadFailed(f"cannot read the adapter weights: {e}", where=str(path)) from None
