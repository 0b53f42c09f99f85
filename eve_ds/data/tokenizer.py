"""BPE text tokenizer (HuggingFace ``tokenizers``) with fixed-length padding for batching."""
from pathlib import Path

import torch
from tokenizers import Tokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class TextTokenizer:

    def __init__(self, path, max_len: int):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist (train one with tools/train_tokenizer.py)")
        self.tokenizer = Tokenizer.from_file(str(path))
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if self.tokenizer.token_to_id(token) != expected_id:
                raise ValueError(f"tokenizer {path} must map {token} to id {expected_id}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = range(len(SPECIAL_TOKENS))
        self.max_len = max_len
        self.tokenizer.enable_truncation(max_len)
        self.tokenizer.enable_padding(length=max_len, pad_id=self.pad_id, pad_token="[PAD]")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str):
        """Returns ids [max_len], padding mask [max_len] (True for real tokens) and maskable [max_len]
        (real, non-special tokens)."""
        encoding = self.tokenizer.encode(text)
        ids = torch.tensor(encoding.ids, dtype=torch.long)
        padding_mask = torch.tensor(encoding.attention_mask, dtype=torch.bool)
        maskable = padding_mask & ~torch.tensor(encoding.special_tokens_mask, dtype=torch.bool)
        return ids, padding_mask, maskable

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))
