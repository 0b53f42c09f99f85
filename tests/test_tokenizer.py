"""Tests for eve_ds/data/tokenizer.py: our tokenizer's encodings, foreign tokenizers found by role, and a
tokenizer saved into a folder and opened there again."""
import json

import pytest
import torch

from eve_ds.config import ConfigError
from eve_ds.data.tokenizer import SPECIAL_TOKENS_FILE, TOKENIZER_FILE, TextTokenizer
from eve_ds.errors import UsageError
from tests.test_data import TOKENIZER, shipped_records

PAD, UNK, CLS, SEP, MASK = range(5)


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(TOKENIZER, max_len=32)


def check_encoding(ids, padding_mask, maskable, max_len):
    assert ids.shape == padding_mask.shape == maskable.shape == (max_len,)
    assert ids.dtype == torch.long and padding_mask.dtype == torch.bool and maskable.dtype == torch.bool
    num_real = int(padding_mask.sum())
    # Real tokens form a prefix.
    assert padding_mask[:num_real].all() and not padding_mask[num_real:].any()
    assert ids[0] == CLS
    assert ids[num_real - 1] == SEP
    assert (ids[num_real:] == PAD).all()
    # maskable = real tokens that are not special.
    assert not maskable[0] and not maskable[num_real - 1] and not maskable[num_real:].any()
    assert maskable[1:num_real - 1].all()
    assert not (maskable & ~padding_mask).any()
    assert ((ids[1:num_real - 1] != CLS) & (ids[1:num_real - 1] != SEP) & (ids[1:num_real - 1] != PAD)).all()
    return num_real


def test_tokenizer_special_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (0, 1, 2, 3, 4)
    assert tokenizer.max_len == 32
    assert tokenizer.vocab_size > 5


def test_tokenizer_encode_short_caption(tokenizer):
    ids, padding_mask, maskable = tokenizer.encode("A small red circle in the center")
    num_real = check_encoding(ids, padding_mask, maskable, 32)
    assert 3 <= num_real < 32
    assert int(maskable.sum()) == num_real - 2
    assert tokenizer.decode(ids[1:num_real - 1].tolist()).replace(" ", "").lower() == "asmallredcircleinthecenter"


def test_tokenizer_encode_is_deterministic(tokenizer):
    first = tokenizer.encode("a large blue star on the left")
    second = tokenizer.encode("a large blue star on the left")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_tokenizer_encode_shipped_captions(tokenizer):
    for record in shipped_records(16):
        check_encoding(*tokenizer.encode(record.caption), 32)


def test_tokenizer_truncates_long_caption(tokenizer):
    ids, padding_mask, maskable = tokenizer.encode("a large red ring in the top left corner " * 50)
    assert check_encoding(ids, padding_mask, maskable, 32) == 32
    assert padding_mask.all()
    assert ids[0] == CLS and ids[-1] == SEP
    assert int(maskable.sum()) == 30


def test_tokenizer_empty_caption(tokenizer):
    ids, padding_mask, maskable = tokenizer.encode("")
    assert check_encoding(ids, padding_mask, maskable, 32) == 2
    assert ids[:2].tolist() == [CLS, SEP]
    assert not maskable.any()


@pytest.mark.parametrize("max_len", [8, 64])
def test_tokenizer_other_lengths(max_len):
    tokenizer = TextTokenizer(TOKENIZER, max_len=max_len)
    ids, padding_mask, maskable = tokenizer.encode(shipped_records(1)[0].caption)
    num_real = check_encoding(ids, padding_mask, maskable, max_len)
    if max_len == 8:
        assert num_real == 8


def roberta_style_tokenizer(path, with_mask=True, extra_words=0):
    """A Hugging Face-style tokenizer.json: RoBERTa's special-token names at ids of its own, a post-processor
    that wraps texts as <s> ... </s>, and padding and truncation settings saved in the file; ``extra_words``
    more ordinary tokens (w0, w1, ...) make its vocabulary as large as a test needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {"hello": 0, "world": 1, "<unk>": 2, "<pad>": 3, "a": 4, "<s>": 5, "b": 6, "</s>": 7, "c": 8}
    if with_mask:
        vocab["<mask>"] = 9
    vocab.update({f"w{i}": len(vocab) + i for i in range(extra_words)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([name for name in vocab if name.startswith("<")])
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 7), ("<s>", 5))
    tokenizer.enable_padding(pad_id=3, pad_token="<pad>", length=4)
    tokenizer.enable_truncation(3)
    tokenizer.save(str(path))
    return path


def test_tokenizer_finds_special_tokens_by_role_in_a_foreign_file(tmp_path):
    tokenizer = TextTokenizer(roberta_style_tokenizer(tmp_path / "tokenizer.json"), max_len=8)
    assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id, tokenizer.unk_id) == (5, 7, 3, 9, 2)
    assert tokenizer.ordinary_ids == [0, 1, 4, 6, 8] and tokenizer.vocab_size == 10
    ids, padding_mask, maskable = tokenizer.encode("hello world a zzz")  # the file's own padding/truncation are off
    assert ids.tolist() == [5, 0, 1, 4, 2, 7, 3, 3]
    assert padding_mask.tolist() == [True] * 6 + [False] * 2
    assert maskable.tolist() == [False, True, True, True, True, False, False, False]
    ids, _, _ = tokenizer.encode("a b c a b c a b c")  # cut to max_len, the end token kept
    assert ids.tolist() == [5, 4, 6, 8, 4, 6, 8, 7]


def test_tokenizer_roles_can_be_named_and_a_missing_role_is_one_sentence(tmp_path):
    path = roberta_style_tokenizer(tmp_path / "tokenizer.json", with_mask=False)
    with pytest.raises(ConfigError,
                       match=r"has no mask token \(looked for \[MASK\], <mask>.*--special-token mask=TOKEN"):
        TextTokenizer(path, max_len=8)
    tokenizer = TextTokenizer(path, max_len=8, special_tokens={"mask": "c"})
    assert tokenizer.mask_id == 8 and 8 not in tokenizer.ordinary_ids
    with pytest.raises(ConfigError, match="the mask token 'MASK' is not in its vocabulary"):
        TextTokenizer(path, max_len=8, special_tokens={"mask": "MASK"})
    with pytest.raises(ConfigError, match="unknown special-token role"):
        TextTokenizer(path, max_len=8, special_tokens={"bos": "<s>"})


def test_two_roles_on_one_token_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match=r"the pad and mask roles are both the token '\[PAD\]' \(id 0\); give each "
                                          r"role its own token with --special-token ROLE=TOKEN$"):
        TextTokenizer(TOKENIZER, max_len=16, special_tokens={"mask": "[PAD]"})
    path = roberta_style_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"the cls and sep roles are both the token '</s>' \(id 7\)"):
        TextTokenizer(path, max_len=8, special_tokens={"cls": "</s>"})


def test_tokenizer_vocabulary_must_fit_the_weights_token_table(tokenizer):
    tokenizer.check_fits(tokenizer.vocab_size, "weights")
    with pytest.raises(ConfigError, match=rf"has {tokenizer.vocab_size} tokens but the token table of "
                                          r"EVE_base.pth has 64000 rows"):
        tokenizer.check_fits(64000, "EVE_base.pth")


def test_tokenizer_unreadable_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as a tokenizers JSON file"):
        TextTokenizer(tmp_path / "tokenizer.json", max_len=16)


def test_tokenizer_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"absent.json does not exist \(train one with tools/train_tokenizer.py\)"):
        TextTokenizer(tmp_path / "absent.json", max_len=16)
    assert issubclass(ConfigError, UsageError)


def test_a_saved_tokenizer_opens_from_its_folder_with_its_roles(tmp_path):
    path = roberta_style_tokenizer(tmp_path / "foreign.json", with_mask=False)
    original = TextTokenizer(path, max_len=8, special_tokens={"mask": "c"})
    original.save(tmp_path / "folder")
    assert (tmp_path / "folder" / TOKENIZER_FILE).read_bytes() == path.read_bytes()
    assert json.loads((tmp_path / "folder" / SPECIAL_TOKENS_FILE).read_text()) == {
        "cls": "<s>", "sep": "</s>", "pad": "<pad>", "mask": "c", "unk": "<unk>"}
    reopened = TextTokenizer.from_folder(tmp_path / "folder", max_len=8)
    assert (reopened.cls_id, reopened.sep_id, reopened.pad_id, reopened.mask_id, reopened.unk_id) == (5, 7, 3, 8, 2)
    assert reopened.ordinary_ids == original.ordinary_ids
    assert TextTokenizer.from_folder(tmp_path / "folder", 8, special_tokens={"mask": "b"}).mask_id == 6  # overrides
    (tmp_path / "folder" / SPECIAL_TOKENS_FILE).write_text("[1, 2]")
    with pytest.raises(ConfigError, match="special_tokens.json is not an object of role -> token strings"):
        TextTokenizer.from_folder(tmp_path / "folder", max_len=8)
