"""loraforge: LoRA/QLoRA fine-tuning of open-weight LLMs, from raw data to a shipped model.

Stages (each a subpackage, data flows one way): config -> data -> model -> train -> eval/export/serve.
The command line lives in `loraforge.cli`; `loraforge --help` lists the subcommands.
"""

from loraforge.errors import LoraforgeError

__version__ = "0.1.0"
__all__ = ["LoraforgeError", "__version__"]
