"""Text tokenizer over any ``tokenizers`` JSON file (eve-ds's own BPE, a Hugging Face ``tokenizer.json``,
the EVE authors' 64k BPE), wrapping each text as ``[CLS] tokens [SEP]`` and padding it to a fixed length.

The special tokens are found by their role, not by their ids: each role has the names that the common
tokenizer families give it, and a caller may name the token of any role instead.
"""
from pathlib import Path

import torch
from tokenizers import Tokenizer

# Role -> the usual names of its token, in the order they are tried (BERT, RoBERTa/XLM-R, others).
ROLE_NAMES = {
    "cls": ("[CLS]", "<s>", "<cls>", "[BOS]", "<bos>", "<|startoftext|>"),
    "sep": ("[SEP]", "</s>", "<sep>", "[EOS]", "<eos>", "<|endoftext|>"),
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
}
# Byte-level vocabularies encode every text and have no unknown token.
OPTIONAL_ROLES = ("unk", )


class TextTokenizer:
    """``special_tokens`` names the token of a role explicitly, e.g. ``{"cls": "<s>", "sep": "</s>"}``."""

    def __init__(self, path, max_len: int, special_tokens: dict = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist (train one with tools/train_tokenizer.py)")
        if max_len < 2:
            raise ValueError(f"max_len {max_len} leaves no room for the class and separator tokens")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises its own exception type
            raise ValueError(f"tokenizer {path} cannot be read as a tokenizers JSON file ({error})") from None
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.path, self.max_len = path, max_len
        ids = self._special_ids(special_tokens or {})
        self.cls_id, self.sep_id, self.pad_id, self.mask_id, self.unk_id = (ids.get(role) for role in ROLE_NAMES)
        special = set(ids.values())
        # Replacement tokens for BERT-style masking: any token but the special ones.
        self.ordinary_ids = [i for i in range(self.vocab_size) if i not in special]

    def _special_ids(self, named: dict) -> dict:
        unknown_roles = sorted(set(named) - set(ROLE_NAMES))
        if unknown_roles:
            raise ValueError(f"tokenizer {self.path}: unknown special-token role(s) {', '.join(unknown_roles)}; "
                             f"the roles are {', '.join(ROLE_NAMES)}")
        ids = {}
        for role, names in ROLE_NAMES.items():
            candidates = (named[role], ) if role in named else names
            token_id = next((i for i in map(self.tokenizer.token_to_id, candidates) if i is not None), None)
            if token_id is not None:
                ids[role] = token_id
            elif role in named:
                raise ValueError(f"tokenizer {self.path}: the {role} token '{named[role]}' is not in its vocabulary")
            elif role not in OPTIONAL_ROLES:
                raise ValueError(f"tokenizer {self.path} has no {role} token (looked for {', '.join(names)}); "
                                 f"name it explicitly, e.g. --special-token {role}=TOKEN")
        return ids

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def check_fits(self, table_rows: int, weights):
        """Raises ValueError unless the token table of ``weights`` has one row per token of this vocabulary."""
        if table_rows != self.vocab_size:
            raise ValueError(f"tokenizer {self.path} has {self.vocab_size} tokens but the token table of {weights} "
                             f"has {table_rows} rows: use the tokenizer those weights were trained with")

    def encode(self, text: str):
        """Returns ids [max_len], padding mask [max_len] (True for real tokens) and maskable [max_len]
        (real, non-special tokens)."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        body = encoding.ids[:self.max_len - 2]
        ids = torch.full((self.max_len, ), self.pad_id, dtype=torch.long)
        ids[:len(body) + 2] = torch.tensor([self.cls_id, *body, self.sep_id], dtype=torch.long)
        padding_mask = torch.arange(self.max_len) < len(body) + 2
        maskable = torch.zeros(self.max_len, dtype=torch.bool)
        maskable[1:len(body) + 1] = ~torch.tensor(encoding.special_tokens_mask[:len(body)], dtype=torch.bool)
        return ids, padding_mask, maskable

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))
