"""Tests for eve_ds/data/text.py: the flip rule and the authors' text normalisation (where they are applied:
test_data.py for pre-training, test_finetune_data.py for fine-tuning)."""
import pytest

from eve_ds.data.text import EmptyText, may_mirror, pre_caption, pre_question

# ---------------------------------------------------------------- the flip rule


@pytest.mark.parametrize("text", [
    "the rightmost shelf", "the leftmost animal", "Left of the bus, is there a car?", "LEFT", "LEFTMOST",
    "the right-hand side", "a lefty pitcher", "Rightward", "on the man's left.", "(right)", "turn-left", "left/right",
    "What is on the\tleft?", "leftover paint",
])
def test_a_word_beginning_with_left_or_right_stops_the_flip(text):
    assert not may_mirror(text)


@pytest.mark.parametrize("text", [
    "Is the light bright?", "an upright piano", "alright then", "copyright 2020", "a cleft chin", "Brightness",
    "a birthright", "outright", "a red circle", "",
])
def test_words_that_only_contain_left_or_right_do_not(text):
    assert may_mirror(text)


def test_one_side_word_among_several_texts_stops_the_flip():
    assert not may_mirror("Which shelf is it?", "the top one", "RIGHTMOST")
    assert may_mirror("Which shelf is it?", "the top one", "the bright one")
    assert may_mirror()


def test_the_authors_case_sensitive_substring_rule_differs_where_eve_ds_means_to():
    def authors_flip(*texts):  # dataset/vqa_dataset.py, left_or_right_in: 'left' in s or 'right' in s
        return not any("left" in text or "right" in text for text in texts)

    assert authors_flip("Left of the bus, is there a car?") and not may_mirror("Left of the bus, is there a car?")
    assert not authors_flip("Is the light bright?") and may_mirror("Is the light bright?")
    assert not authors_flip("the rightmost shelf") and not may_mirror("the rightmost shelf")


# ---------------------------------------------------------------- normalisation: a reference written without regexes


QUESTION_DELETED = set(",.'!?\"()*#:;~")
CAPTION_DELETED = QUESTION_DELETED | {"`"}


def reference_pre_question(question, max_words):
    """dataset/utils.py pre_question, spelt out: delete the marks, '-' and '/' to spaces, strip trailing spaces,
    keep the first max_words of str.split(' ') (empty words included)."""
    text = "".join(c for c in question.lower() if c not in QUESTION_DELETED).replace("-", " ").replace("/", " ")
    while text.endswith(" "):
        text = text[:-1]
    return " ".join(text.split(" ")[:max_words])


def reference_pre_caption(caption, max_words):
    """dataset/utils.py pre_caption, spelt out: the marks and '`' deleted, '-' and '/' to spaces, '<person>' to
    'person', runs of white space to one space, both ends stripped, the first max_words kept; empty is an error."""
    text = "".join(c for c in caption.lower() if c not in CAPTION_DELETED).replace("-", " ").replace("/", " ")
    text = " ".join(text.replace("<person>", "person").split())
    text = " ".join(text.split(" ")[:max_words])
    if not text:
        raise ValueError("empty")
    return text


TRICKY = [
    "What's on the man's LEFT?", "Is the light bright?  ", "  two  leading spaces", "A man--with a t-shirt/hat.",
    "<PERSON> rides a bike.", "It`s \"quoted\" (really)*#:;~!", "tabs\tand\nnewlines\n", "50% off [sale] & more @ 3$",
    "Café — NAÏVE", "a  b c d", "under_score and back\\slash", "one. two, three! four? five",
    " ".join(f"w{n}," for n in range(60)), "x " * 45 + "?",
]


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("max_words", [2, 30, 40, 50])
def test_normalisation_follows_the_authors_formulas(text, max_words):
    assert pre_question(text, max_words) == reference_pre_question(text, max_words)
    assert pre_caption(text, max_words) == reference_pre_caption(text, max_words)


def test_normalisation_on_hand_worked_strings():
    assert pre_question("What's on the man's LEFT?", 30) == "whats on the mans left"
    assert pre_caption("What's on the man's LEFT?", 30) == "whats on the mans left"
    # Questions keep repeated and leading spaces (each extra one an empty word), tabs and newlines; captions fold.
    assert pre_question("  Is it  red? ", 30) == "  is it  red"
    assert pre_caption("  Is it  red? ", 30) == "is it red"
    assert pre_question("A man--with a t-shirt/hat.", 30) == "a man  with a t shirt hat"
    assert pre_caption("A man--with a t-shirt/hat.", 30) == "a man with a t shirt hat"
    assert pre_question("a\tb\n", 30) == "a\tb\n" and pre_caption("a\tb\n", 30) == "a b"
    assert pre_question("a  b c", 2) == "a " and pre_caption("a  b c", 2) == "a b"
    # Only captions delete '`' and read '<person>' as 'person'.
    assert pre_question("<Person> isn`t", 30) == "<person> isn`t"
    assert pre_caption("<Person> isn`t", 30) == "person isnt"
    # Other marks stay.
    assert pre_caption("50% off [sale] & more", 30) == "50% off [sale] & more"


def test_word_limits_keep_the_first_words():
    long = " ".join(f"Word{n}" for n in range(60)) + "?"
    assert pre_question(long, 30).split() == [f"word{n}" for n in range(30)]
    assert pre_caption(long, 50).split() == [f"word{n}" for n in range(50)]
    assert pre_caption("exactly three words", 3) == "exactly three words"


def test_a_caption_without_a_word_is_refused_a_question_is_not():
    for text in ("...", " ?! ", "``", "- /"):
        with pytest.raises(EmptyText):
            pre_caption(text, 30)
    assert issubclass(EmptyText, ValueError)
    assert pre_question("?!", 30) == ""
