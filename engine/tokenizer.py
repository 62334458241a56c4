"""`tokenizer.json` (Hugging Face `tokenizers`) wrapper (the incremental detokenizer is engine.stop's)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from engine.config import CheckpointError, load_config


class Tokenizer:
    """encode/decode with the checkpoint's tokenizer.json.

    encode() adds special tokens only when tokenizer.json's post-processor does (e.g. Llama's BOS).
    """

    def __init__(self, path: str | Path, eos_token_ids: Sequence[int] = ()) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({e})") from e
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Tokenizer:
        """tokenizer.json + eos ids from config.json / generation_config.json."""
        return cls(Path(model_dir) / "tokenizer.json", load_config(model_dir).eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
