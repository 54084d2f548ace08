from .official import load_official_tokenizer

__all__ = ["load_official_tokenizer"]
