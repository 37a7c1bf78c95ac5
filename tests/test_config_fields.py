"""Every config field does something: each field of every section of RunConfig is read somewhere in the
package outside config.py (an attribute access `.name`, or the name as a string for getattr/dict access).
A field nobody reads is a key that lies to the user, and fails here."""

import ast
from pathlib import Path

from pydantic import BaseModel

from loraforge.config import RunConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "loraforge"
# fields made real by work merged separately; each must still be unread here, so this list cannot go stale
PENDING: dict[str, str] = {}   # field -> why it is not read yet (none now)


def _all_fields() -> list[str]:
    out = []
    for name, field in RunConfig.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += [f"{name}.{sub}" for sub in ann.model_fields]
        else:
            out.append(name)
    return out


def _names_read() -> set[str]:
    seen = set()
    for path in SRC.rglob("*.py"):
        if path.name == "config.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                seen.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                seen.add(node.value)
    return seen


def test_every_config_field_is_read():
    seen = _names_read()
    unread = [f for f in _all_fields() if f.rsplit(".", 1)[-1] not in seen and f not in PENDING]
    assert unread == [], f"config fields no code reads (they do nothing): {unread}"


def test_pending_fields_are_still_pending():
    seen = _names_read()
    done = [f for f in PENDING if f.rsplit(".", 1)[-1] in seen]
    assert done == [], f"now read by the code: remove {done} from PENDING in this test"


def test_the_scan_sees_a_real_read_and_misses_a_dead_key():
    seen = _names_read()
    assert "learning_rate" in seen and "keep_last" in seen
    assert "no_such_config_field_anywhere" not in seen
