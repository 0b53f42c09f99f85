"""Text tokenizer over any ``tokenizers`` JSON file (eve-ds's own BPE, a Hugging Face ``tokenizer.json``,
the EVE authors' 64k BPE), wrapping each text as ``[CLS] tokens [SEP]`` and padding it to a fixed length.

The special tokens are found by their role, not by their ids: each role has the names that the common
tokenizer families give it, and a caller may name the token of any role instead.

A tokenizer travels with the weights: ``save`` writes it and its roles into a checkpoint or weights folder, and
``TextTokenizer.from_folder`` opens it there again with the same roles.
"""
import argparse
import itertools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from eve_ds.config import ConfigError

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
# What ``save`` writes into a folder: the tokenizers JSON file, and role -> token.
TOKENIZER_FILE, SPECIAL_TOKENS_FILE = "tokenizer.json", "special_tokens.json"


def role_and_token(text: str) -> tuple:
    """An argparse type for ``--special-token ROLE=TOKEN``; ``dict()`` of the repeated option gives the roles."""
    role, is_pair, token = text.partition("=")
    if not is_pair or not token:
        raise argparse.ArgumentTypeError(f"wants ROLE=TOKEN, got '{text}'")
    if role not in ROLE_NAMES:
        raise argparse.ArgumentTypeError(f"unknown role '{role}'; the roles are {', '.join(ROLE_NAMES)}")
    return role, token


def saved_special_tokens(folder) -> dict:
    """The roles ``save`` wrote into ``folder`` ({} where there are none)."""
    path = Path(folder) / SPECIAL_TOKENS_FILE
    if not path.is_file():
        return {}
    try:
        roles = json.loads(path.read_text())
    except ValueError as error:  # not JSON, or not UTF-8
        raise ConfigError(f"{path} cannot be read as JSON ({error})") from None
    if not isinstance(roles, dict) or not all(isinstance(token, str) for token in roles.values()):
        raise ConfigError(f"{path} is not an object of role -> token strings")
    return roles


class TextTokenizer:
    """``special_tokens`` names the token of a role explicitly, e.g. ``{"cls": "<s>", "sep": "</s>"}``."""

    def __init__(self, path, max_len: int, special_tokens: dict = None):
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer file {path} does not exist (train one with tools/train_tokenizer.py)")
        if max_len < 2:
            raise ConfigError(f"max_len {max_len} leaves no room for the class and separator tokens")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises its own exception type
            raise ConfigError(f"tokenizer {path} cannot be read as a tokenizers JSON file ({error})") from None
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.path, self.max_len = path, max_len
        ids = self._special_ids(special_tokens or {})
        self.cls_id, self.sep_id, self.pad_id, self.mask_id, self.unk_id = (ids.get(role) for role in ROLE_NAMES)
        self.special_tokens = {role: self.tokenizer.id_to_token(token_id) for role, token_id in ids.items()}
        special = set(ids.values())
        # Replacement tokens for BERT-style masking: any token but the special ones.
        self.ordinary_ids = [i for i in range(self.vocab_size) if i not in special]

    def _special_ids(self, named: dict) -> dict:
        unknown_roles = sorted(set(named) - set(ROLE_NAMES))
        if unknown_roles:
            raise ConfigError(f"tokenizer {self.path}: unknown special-token role(s) {', '.join(unknown_roles)}; "
                              f"the roles are {', '.join(ROLE_NAMES)}")
        ids = {}
        for role, names in ROLE_NAMES.items():
            candidates = (named[role], ) if role in named else names
            token_id = next((i for i in map(self.tokenizer.token_to_id, candidates) if i is not None), None)
            if token_id is not None:
                ids[role] = token_id
            elif role in named:
                raise ConfigError(f"tokenizer {self.path}: the {role} token '{named[role]}' is not in its vocabulary")
            elif role not in OPTIONAL_ROLES:
                raise ConfigError(f"tokenizer {self.path} has no {role} token (looked for {', '.join(names)}); "
                                  f"name it explicitly, e.g. --special-token {role}=TOKEN")
        for role, other in itertools.combinations(ids, 2):
            if ids[role] == ids[other]:
                raise ConfigError(f"tokenizer {self.path}: the {role} and {other} roles are both the token "
                                  f"'{self.tokenizer.id_to_token(ids[role])}' (id {ids[role]}); give each role its "
                                  "own token with --special-token ROLE=TOKEN")
        return ids

    @classmethod
    def from_folder(cls, folder, max_len: int, special_tokens: dict = None) -> "TextTokenizer":
        """The tokenizer that ``save`` wrote into ``folder``, with its saved roles; ``special_tokens`` overrides
        them."""
        return cls(Path(folder) / TOKENIZER_FILE, max_len, {**saved_special_tokens(folder), **(special_tokens or {})})

    def save(self, folder):
        """Writes ``tokenizer.json`` (a copy of this tokenizer's file) and ``special_tokens.json`` (role -> token of
        every role found) into ``folder``, each through a temporary name."""
        from eve_ds.checkpoint.pretrained import write_atomically  # eve_ds.checkpoint imports this module

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        content = self.path.read_bytes()
        write_atomically(folder / TOKENIZER_FILE, lambda path: path.write_bytes(content))
        roles = json.dumps(self.special_tokens, indent=2) + "\n"
        write_atomically(folder / SPECIAL_TOKENS_FILE, lambda path: path.write_text(roles))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def check_fits(self, table_rows: int, weights):
        """Raises ConfigError unless the token table of ``weights`` has one row per token of this vocabulary."""
        if table_rows != self.vocab_size:
            raise ConfigError(f"tokenizer {self.path} has {self.vocab_size} tokens but the token table of {weights} "
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
