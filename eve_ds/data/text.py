"""The rules about text that pre-training and fine-tuning share: when an image may be mirrored, and the authors'
text normalisation (``pre_caption`` and ``pre_question`` of their ``dataset/utils.py``).

Mirroring. A horizontal flip makes a text that names a side false. eve-ds never mirrors an image whose text has a
word beginning with "left" or "right", in any case: "Left of the bus", "LEFT", "leftmost", "lefty", "right-hand",
"rightmost" ("leftover" and "righteous" too, the price of a simple rule). Words that only contain them ("bright",
"upright", "alright", "copyright", "cleft") do not stop a flip. The authors' test differs: a case-sensitive
substring test, so they mirror "Left of the bus" and never mirror "Is the light bright?".

Normalisation, as the authors' fine-tuning applies it (their weights were trained on it): lower case, a set of
punctuation marks deleted, "-" and "/" made spaces, then the first ``max_words`` words kept. The two functions
differ in their details, reproduced here exactly: only ``pre_caption`` deletes "`", turns "<person>" into
"person", folds every run of white space to one space and strips both ends (and refuses a caption left empty);
``pre_question`` strips spaces at the end only, so repeated or leading spaces stay, and each extra space counts
as an (empty) word towards the limit.
"""
import re

_SIDE_WORD = re.compile(r"\b(?:left|right)", re.IGNORECASE)
_QUESTION_MARKS = re.compile(r"[,.'!?\"()*#:;~]")
_CAPTION_MARKS = re.compile(r"[,.'!?\"()*#:;~`]")
_WHITE_SPACE = re.compile(r"\s+")


class EmptyText(ValueError):
    """A caption that normalisation leaves without a word."""


def may_mirror(*texts: str) -> bool:
    """Whether an image that these texts describe (caption; question and answers) may be flipped horizontally:
    none of them has a word beginning with "left" or "right", in any case."""
    return not any(_SIDE_WORD.search(text) for text in texts)


def _first_words(text: str, max_words: int) -> str:
    # Words are what str.split(" ") gives, empty ones included, as the authors count them.
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_question(question: str, max_words: int) -> str:
    """The authors' question normalisation (VQA)."""
    question = _QUESTION_MARKS.sub("", question.lower()).replace("-", " ").replace("/", " ")
    return _first_words(question.rstrip(" "), max_words)


def pre_caption(caption: str, max_words: int) -> str:
    """The authors' caption normalisation (NLVR2 sentences, retrieval captions); raises EmptyText where no word
    is left."""
    caption = _CAPTION_MARKS.sub("", caption.lower()).replace("-", " ").replace("/", " ")
    caption = _WHITE_SPACE.sub(" ", caption.replace("<person>", "person")).strip(" ")
    caption = _first_words(caption, max_words)
    if not caption:
        raise EmptyText("the caption has no word once normalised")
    return caption
