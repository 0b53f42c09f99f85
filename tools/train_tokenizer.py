"""Train a BPE tokenizer on the captions of JSONL manifests or tar shard sets.

Each manifest line is a JSON object with a string "caption"; lines that are
not valid JSON or have no string caption are skipped and counted. A shard set
is a brace pattern (cc3m/{00000..00331}.tar), a folder of .tar files or one
file; every caption of a sample counts (tools/make_shards.py keeps several).
Both are streamed, so large ones are fine. The vocabulary has 64,000 tokens
by default, as EVE's.

The saved tokenizer lowercases and strips accents, splits on whitespace and
punctuation (marking word starts with "▁" so decoding restores spaces), and
wraps every single sequence as "[CLS] ... [SEP]". Special token ids are
fixed: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. Padding and truncation
are left off; the data loader handles them. Training is deterministic.

Usage:
    python tools/train_tokenizer.py data/shapes/manifest.jsonl --out data/shapes/tokenizer.json --vocab-size 1000
    python tools/train_tokenizer.py "/data/cc3m/{00000..00331}.tar" --out /data/eve_tokenizer.json
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.data.shards import captions_of, expand_pattern, iter_shard  # noqa: E402

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def is_manifest(source: str) -> bool:
    return source.endswith((".jsonl", ".json"))


class CaptionReader:
    """Iterates over the captions of manifests and shard sets and counts what it skipped."""

    def __init__(self, sources):
        self.sources = sources
        self.captions_read = 0
        self.lines_skipped = 0
        self.shard_problems = Counter()

    def __iter__(self):
        for source in self.sources:
            if not is_manifest(source):
                for shard in expand_pattern(source):
                    for _, files in iter_shard(shard, self.shard_problems):
                        for caption in captions_of(files, self.shard_problems):
                            self.captions_read += 1
                            yield caption
                continue
            with open(source, encoding="utf-8", errors="replace") as manifest:
                for line in manifest:
                    if not line.strip():
                        continue
                    try:
                        caption = json.loads(line).get("caption")
                    except (json.JSONDecodeError, AttributeError):
                        caption = None  # not JSON, or JSON that is not an object
                    if isinstance(caption, str):
                        self.captions_read += 1
                        yield caption
                    else:
                        self.lines_skipped += 1


def build_tokenizer():
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    # Splits like the Whitespace pre-tokenizer (words and punctuation apart) but marks
    # word starts with "▁" so decode() can restore the spaces. An end_of_word_suffix
    # would do that too, but makes training non-deterministic (tokenizers issue #1794).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(prepend_scheme="always", split=False),
        pre_tokenizers.Punctuation(),
    ])
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="always", split=False)
    return tokenizer


def train_tokenizer(texts, vocab_size: int, min_frequency: int) -> Tokenizer:
    """The BPE tokenizer trained over ``texts`` (an iterable of strings), special tokens first, [CLS] ... [SEP]."""
    tokenizer = build_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Special tokens are added first by the trainer; check rather than assume their ids.
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected_id, (token, tokenizer.token_to_id(token))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="JSONL manifests or shard sets (brace pattern, folder, .tar)")
    parser.add_argument("--out", type=Path, required=True, help="path of the tokenizer.json to write")
    parser.add_argument("--vocab-size", type=int, default=64000)
    parser.add_argument("--min-frequency", type=int, default=2)
    args = parser.parse_args()

    for source in args.sources:
        missing = [path for path in ([Path(source)] if is_manifest(source) else expand_pattern(source))
                   if not path.is_file()]
        if missing:
            raise SystemExit(f"Not found: {', '.join(map(str, missing[:5]))}")

    reader = CaptionReader(args.sources)
    tokenizer = train_tokenizer(reader, args.vocab_size, args.min_frequency)
    print(f"read {reader.captions_read} captions, skipped {reader.lines_skipped} malformed lines"
          + (f"; in shards: {dict(reader.shard_problems)}" if reader.shard_problems else ""))
    if reader.captions_read == 0:
        raise SystemExit("No captions found in the given sources.")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out))
    sample = tokenizer.encode("A large red circle to the left of a small blue square")
    print(f"vocab size: {tokenizer.get_vocab_size()}")
    print(f"sample tokens: {sample.tokens}")
    print(f"sample ids: {sample.ids}")


if __name__ == "__main__":
    main()
