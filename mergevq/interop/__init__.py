from .hub import HubGenerator, HubTokenizer, export_run, from_pretrained, save_pretrained
from .magvit2_import import CheckpointLayoutError, load_open_magvit2_gpt, load_open_magvit2_tokenizer
from .official import load_official_tokenizer

__all__ = [
    "CheckpointLayoutError",
    "HubGenerator",
    "HubTokenizer",
    "export_run",
    "from_pretrained",
    "load_official_tokenizer",
    "load_open_magvit2_gpt",
    "load_open_magvit2_tokenizer",
    "save_pretrained",
]
