"""The files a finished run left behind, found once from its folder: what eval, export and serve take.

    files = RunFiles.of_run("runs/x")          # a finished run folder: config.yaml + adapter/ (eval)
    files = RunFiles.find("runs/x")            # a run folder or a bare PEFT adapter folder (export)
    files.adapter_dir, files.base_model, files.config(), files.tokenizer_source(base_path)

It lives in train, the stage that writes the run folder (train/folder.py's RunFolder creates it; this
reads it back), so every later stage (eval, export, serve) may import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from loraforge.config import RunConfig, load_config
from loraforge.errors import LoraforgeError


@dataclass(frozen=True)
class RunFiles:
    run_dir: Path
    adapter_dir: Path
    base_model: str            # as the run named it (alias, folder, .gguf or Hub id)
    adapter_config: dict       # adapter_config.json ({} where an unfinished adapter folder has none)
    run_config: dict           # config.yaml as a tree ({} for a bare adapter folder)
    config_path: Path | None = None

    @classmethod
    def of_run(cls, run_dir: str | Path) -> RunFiles:
        """A finished training run folder (config.yaml and adapter/); the adapter's own files are checked
        only when it is loaded, so an evaluation still reports the base when they are missing."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file() or not (run_dir / "adapter").is_dir():
            raise LoraforgeError("not a finished run folder (config.yaml and adapter/ are needed)",
                                 where=str(run_dir), hint="pass the output_dir of a `loraforge train` run")
        adapter_dir = run_dir / "adapter"
        acfg = adapter_dir / "adapter_config.json"
        adapter_cfg = json.loads(acfg.read_text()) if acfg.is_file() else {}
        run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        base_model = run_cfg.get("base_model") or adapter_cfg.get("base_model_name_or_path") or ""
        return cls(run_dir, adapter_dir, str(base_model), adapter_cfg, run_cfg, run_dir / "config.yaml")

    @classmethod
    def find(cls, path: str | Path, base: str | None = None) -> RunFiles:
        """The adapter folder and base model of a run folder (or of a bare PEFT adapter folder); `base`
        overrides the base the run names."""
        run_dir = Path(path)
        if not run_dir.exists():
            raise LoraforgeError("this run folder does not exist", where=str(run_dir))
        adapter_dir = cls.adapter_in(run_dir)
        if adapter_dir is None:
            raise LoraforgeError("no adapter here: expected adapter/adapter_config.json (a finished run) or "
                                 "adapter_config.json (a PEFT adapter folder)", where=str(run_dir),
                                 hint="train first (loraforge train ...), or point at the run folder itself")
        if not any((adapter_dir / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise LoraforgeError("the adapter folder has no adapter_model.safetensors", where=str(adapter_dir),
                                 hint="the run may have been killed before it saved; resume it with --resume")
        adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        run_cfg, config_path = {}, None
        for cand in (run_dir / "config.yaml", adapter_dir.parent / "config.yaml"):
            if cand.is_file():
                run_cfg, config_path = yaml.safe_load(cand.read_text()) or {}, cand
                break
        base_model = base or run_cfg.get("base_model") or adapter_cfg.get("base_model_name_or_path")
        if not base_model:
            raise LoraforgeError("the adapter does not say which base model it belongs to", where=str(adapter_dir),
                                 hint="pass --base with the base model folder")
        return cls(run_dir, adapter_dir, str(base_model), adapter_cfg, run_cfg, config_path)

    @staticmethod
    def adapter_in(path: Path) -> Path | None:
        """The adapter folder of a finished run folder (path/adapter) or of a bare PEFT adapter folder, else None."""
        for cand in (path / "adapter", path):
            if (cand / "adapter_config.json").is_file():
                return cand
        return None

    @classmethod
    def resolve(cls, run: str | Path | RunFiles, base: str | None = None) -> RunFiles:
        """`run` itself when it is already resolved (and no other base is asked for), else `find(run, base)`."""
        if isinstance(run, RunFiles) and (base is None or base == run.base_model):
            return run
        return cls.find(run.run_dir if isinstance(run, RunFiles) else run, base)

    def config(self) -> RunConfig:
        """The run's config.yaml, validated."""
        if self.config_path is None:
            raise LoraforgeError("this adapter folder has no config.yaml", where=str(self.run_dir),
                                 hint="pass the output_dir of a `loraforge train` run")
        return load_config(self.config_path)

    def tokenizer_source(self, base_path: str) -> str:
        """Where the tokenizer is: the adapter folder when the run saved one there, else the base."""
        return str(self.adapter_dir) if (self.adapter_dir / "tokenizer_config.json").is_file() else base_path
