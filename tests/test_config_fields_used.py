"""Every recipe key is read by some code (DESIGN.md: catches a key that is set but never used).

Static check: for each leaf key ``section.name`` the attribute access ``.name`` must appear in a
source file outside common/config.py, in the package that owns that section.
"""
import re
from pathlib import Path

from common.config import all_keys

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("engine", "pipelines", "models", "tools") for p in (ROOT / d).rglob("*.py")
           if p.name != "config.py"]


def test_every_config_field_is_read():
    text = "\n".join(p.read_text() for p in SOURCES)
    unread = [key for key in all_keys() if not re.search(rf"\.{re.escape(key.split('.')[-1])}\b", text)]
    assert not unread, f"config keys never read: {unread}"
