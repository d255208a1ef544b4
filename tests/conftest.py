import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DRPO_CACHE", str(ROOT / ".cache" / "drpo"))
sys.path.insert(0, str(ROOT))
