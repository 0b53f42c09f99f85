"""The annotation files of EVE's fine-tuning tasks, read as they are downloaded, into records (the
tensors the jobs train on are made from them by ``datasets.py``).

Layouts read (the image folders are given by the caller):

VQA v2
    questions    ``{"questions": [{"image_id": 9, "question": "...", "question_id": 9000}, ...], ...}``
    annotations  ``{"annotations": [{"question_id": 9000, "image_id": 9, "answers": [{"answer": "..."}, ...
                 (10 annotators)], ...}, ...], ...}``; train and val only, test-dev has questions only.
    images       ``IMAGE_ROOT/COCO_<folder>_<image id, 12 digits>.jpg`` with <folder> the image root's name
                 (``train2014/COCO_train2014_000000000009.jpg``); the name template is a parameter.
    answer list  a JSON list of answer strings (the authors' has 3,128); its order is the head's output order.
Visual Genome QA (v1.2, ``question_answers.json``)
    ``[{"id": 1, "qas": [{"qa_id": 986768, "image_id": 1, "question": "What color is the clock?", "answer":
    "Green.", "q_objects": [], "a_objects": []}, ...]}, ...]``: one entry per image, one answer per question (an
    entry's id is also read as "image_id"; a question's own image_id comes first).
    images       ``IMAGE_ROOT/VG_100K/<image id>.jpg`` or ``IMAGE_ROOT/VG_100K_2/<image id>.jpg`` (``images.zip``
                 and ``images2.zip`` unpacked side by side), or ``IMAGE_ROOT/<image id>.jpg``.
NLVR2
    ``train.json``, ``dev.json``, ``test1.json``: JSON lines ``{"identifier": "dev-850-0-0", "sentence": "...",
    "label": "True" | "False", "directory": 53 (train only), ...}``. The identifier is split-set-pair-sentence;
    the pair's left and right images are ``<split-set-pair>-img0.png`` and ``-img1.png``, in
    ``IMAGE_ROOT/<directory>/`` when the line names a directory (train), else in ``IMAGE_ROOT``.
Karpathy splits of COCO and Flickr30K (``dataset_coco.json``, ``dataset_flickr30k.json``)
    ``{"images": [{"filepath": "val2014" (COCO only), "filename": "...", "split": "train" | "restval" | "val" |
    "test", "sentences": [{"raw": "..."}, ...], ...}, ...]}``; image at ``IMAGE_ROOT/filepath/filename``.
    ``restval`` is read as train.

Text is kept as written (the datasets normalise it). Bad input is skipped and counted, not fatal; readers (and
the datasets) expose the counts as a Counter (``problems``) under the keys below, and warn naming the file and
line or entry of a malformed one. A missing image is found once, when a split is read. A file that is missing, or
not in its layout at all, raises FinetuneDataError (a ValueError) naming it.
"""
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from eve_ds.errors import UsageError
from eve_ds.finetune.metrics import normalize_answer

logger = logging.getLogger(__name__)

COCO_IMAGE_NAME = "COCO_{folder}_{image_id:012d}.jpg"
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val", ), "test": ("test", )}
VG_IMAGE_FOLDERS = ("VG_100K", "VG_100K_2")
# Where a VQA training question comes from, as the authors' rows name it (their "dataset" field): the layout it was
# read from, and how its answers score (``datasets.soft_target``).
VQA_V2, VISUAL_GENOME = "vqa", "vg"

# The keys of ``problems``.
MALFORMED_LINE = "malformed_line"  # a JSON-lines line that is not JSON or lacks a required field
MALFORMED_ENTRY = "malformed_entry"  # an entry of a JSON file that lacks a required field
MISSING_IMAGE = "missing_image"
QUESTION_WITHOUT_ANNOTATION = "question_without_annotation"
ANNOTATION_WITHOUT_QUESTION = "annotation_without_question"
ANSWER_NOT_IN_LIST = "answer_not_in_list"  # once per question and distinct answer
QUESTION_WITHOUT_KNOWN_ANSWER = "question_without_known_answer"  # left out of training
IMAGE_WITHOUT_CAPTIONS = "image_without_captions"  # also one whose captions normalisation all leaves empty
EMPTY_ONCE_NORMALISED = "empty_once_normalised"  # a sentence or caption with no word left (``datasets.py``)


class FinetuneDataError(UsageError):
    """A fine-tuning data file that is missing, or not in the layout its reader expects (a ValueError; a job ends
    with its sentence)."""


@dataclass(frozen=True)
class VQAQuestion:
    question_id: int
    image_path: Path
    question: str
    answers: tuple = ()  # the annotators' answers as written (VG: its one answer); empty for test-dev
    dataset: str = VQA_V2  # or VISUAL_GENOME
    source: str = field(default="", compare=False)  # the file it was read from, for counts per source


@dataclass(frozen=True)
class VQASource:
    """One set of VQA training questions as downloaded: VQA v2's questions, annotations and image folder (with
    its image-name template, else the caller's), or Visual Genome's question_answers.json and image folder."""
    dataset: str  # VQA_V2 or VISUAL_GENOME
    questions: Path  # VQA v2's questions file, or VG's question_answers.json
    images: Path
    annotations: Path = None  # VQA v2 only
    image_name: str = None  # VQA v2 only

    def read(self, image_name: str = COCO_IMAGE_NAME) -> tuple:
        """(questions [VQAQuestion], problems) of the source."""
        if self.dataset == VISUAL_GENOME:
            return read_visual_genome_qa(self.questions, self.images)
        return read_vqa(self.questions, self.images, self.annotations, self.image_name or image_name)


@dataclass(frozen=True)
class NLVR2Example:
    identifier: str
    left_image_path: Path  # img0
    right_image_path: Path  # img1
    sentence: str
    label: int  # 1 when the sentence is true of the pair


@dataclass(frozen=True)
class CaptionedImage:
    image_path: Path
    captions: tuple


# ---------------------------------------------------------------- shared parsing


def _load_json(path: Path, what: str):
    if not path.is_file():
        raise FinetuneDataError(f"{what} file {path} does not exist")
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FinetuneDataError(f"{what} file {path} is not JSON ({error})") from None


def _entry_list(document, key: str, path: Path, what: str) -> list:
    entries = document.get(key) if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise FinetuneDataError(f"{path} is not a {what} file: expected a JSON object with a '{key}' list")
    return entries


def _json_lines(path: Path, what: str):
    """Yields (line number, text) of the non-blank lines."""
    if not path.is_file():
        raise FinetuneDataError(f"{what} file {path} does not exist")
    try:
        with path.open(encoding="utf-8") as lines:
            yield from ((number, line) for number, line in enumerate(lines, 1) if line.strip())
    except UnicodeDecodeError as error:
        raise FinetuneDataError(f"{what} file {path} is not text ({error})") from None


def _field(entry, name: str, kind):
    """entry[name] if it is a ``kind`` (a type or a tuple of types; not a bool, not a blank string); raises
    ValueError otherwise."""
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    value = entry.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        kinds = kind if isinstance(kind, tuple) else (kind, )
        raise ValueError(f"'{name}' is missing, empty or not a {' or '.join(k.__name__ for k in kinds)}")
    return value


def _skip(problems: Counter, key: str, path: Path, where: str, error: ValueError):
    problems[key] += 1
    logger.warning("%s: %s skipped: %s", path, where, error)


def _parse_entries(entries: list, parse, path: Path, problems: Counter) -> list:
    parsed = []
    for number, entry in enumerate(entries, 1):
        try:
            parsed.append(parse(entry))
        except ValueError as error:
            _skip(problems, MALFORMED_ENTRY, path, f"entry {number}", error)
    return parsed


class _ImageFiles:
    """Whether each image file exists, looked up once per file; remembers the missing ones for one warning."""

    def __init__(self):
        self.known, self.missing = {}, []

    def exist(self, *paths: Path) -> bool:
        for path in paths:
            if path not in self.known:
                self.known[path] = path.is_file()
                if not self.known[path]:
                    self.missing.append(path)
        return all(self.known[path] for path in paths)

    def warn(self, source: Path, skipped: int):
        if skipped:
            logger.warning("%s: skipped %d examples whose image is missing (%d files, first %s)", source, skipped,
                           len(self.missing), self.missing[0])


def _require_some(records: list, source: Path, problems: Counter, image_files: _ImageFiles, what: str) -> list:
    if records:
        return records
    hint = f"; is the image folder right? (no {image_files.missing[0]})" if image_files.missing else ""
    raise FinetuneDataError(f"{source} has no usable {what} (skipped: {dict(problems) or 'none'}){hint}")


# ---------------------------------------------------------------- VQA v2


def _parse_question(entry) -> tuple:
    return _field(entry, "question_id", int), _field(entry, "image_id", int), _field(entry, "question", str)


def _parse_annotation(entry) -> tuple:
    answers = _field(entry, "answers", list)
    if not all(isinstance(answer, dict) and isinstance(answer.get("answer"), str) for answer in answers):
        raise ValueError("an item of 'answers' has no 'answer' string")
    return _field(entry, "question_id", int), tuple(answer["answer"] for answer in answers)


def read_vqa(questions_path, image_root, annotations_path=None, image_name: str = COCO_IMAGE_NAME) -> tuple:
    """Returns (questions [VQAQuestion], problems). With annotations, each question carries its annotators'
    answers and one without annotation is skipped; without (test-dev), answers are empty. ``image_name`` is
    formatted with ``folder`` (the image root's name) and ``image_id``."""
    questions_path, image_root, problems = Path(questions_path), Path(image_root), Counter()
    entries = _entry_list(_load_json(questions_path, "VQA questions"), "questions", questions_path, "VQA questions")
    questions = _parse_entries(entries, _parse_question, questions_path, problems)
    answers_by_question = None
    if annotations_path is not None:
        annotations_path = Path(annotations_path)
        entries = _entry_list(_load_json(annotations_path, "VQA annotations"), "annotations", annotations_path,
                              "VQA annotations")
        answers_by_question = dict(_parse_entries(entries, _parse_annotation, annotations_path, problems))
        unasked = answers_by_question.keys() - {question_id for question_id, _, _ in questions}
        if unasked:
            problems[ANNOTATION_WITHOUT_QUESTION] += len(unasked)
    records, image_files, missing = [], _ImageFiles(), 0
    for question_id, image_id, question in questions:
        answers = () if answers_by_question is None else answers_by_question.get(question_id)
        if answers is None:
            problems[QUESTION_WITHOUT_ANNOTATION] += 1
            continue
        image_path = image_root / image_name.format(folder=image_root.name, image_id=image_id)
        if not image_files.exist(image_path):
            missing += 1
            continue
        records.append(VQAQuestion(question_id, image_path, question, answers, VQA_V2, str(questions_path)))
    problems[MISSING_IMAGE] += missing
    image_files.warn(questions_path, missing)
    return _require_some(records, questions_path, +problems, image_files, "question"), +problems


# ---------------------------------------------------------------- Visual Genome QA


def _vg_image_index(image_root: Path) -> dict:
    """Image id -> its ``<image id>.jpg`` in IMAGE_ROOT, IMAGE_ROOT/VG_100K or IMAGE_ROOT/VG_100K_2 (the first
    found): one listing per folder rather than a look-up per image, VG's 108,077 images being in two folders."""
    index = {}
    for folder in (image_root, *(image_root / name for name in VG_IMAGE_FOLDERS)):
        if folder.is_dir():
            with os.scandir(folder) as entries:
                for entry in entries:
                    stem, extension = os.path.splitext(entry.name)
                    if extension == ".jpg" and stem.isdigit() and entry.is_file():
                        index.setdefault(int(stem), folder / entry.name)
    return index


def _is_vg_image(entry) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("qas"), list)


def _parse_vg_qa(qa, image_id) -> tuple:
    """(qa_id, image id, question, answer) of one of an image's questions; ``image_id`` is the image entry's,
    None where it has none."""
    if not isinstance(qa, dict):
        raise ValueError("not a JSON object")
    if qa.get("image_id") is not None or image_id is None:
        image_id = _field(qa, "image_id", int)
    return _field(qa, "qa_id", int), image_id, _field(qa, "question", str), _field(qa, "answer", str)


def read_visual_genome_qa(path, image_root) -> tuple:
    """Returns (questions [VQAQuestion], problems) of Visual Genome's question_answers.json: each question with its
    one answer (``dataset`` VISUAL_GENOME) and its image in ``image_root`` (``_vg_image_index``)."""
    path, image_root, problems = Path(path), Path(image_root), Counter()
    entries = _load_json(path, "Visual Genome QA")
    if not isinstance(entries, list) or (entries and not any(map(_is_vg_image, entries))):
        raise FinetuneDataError(f"{path} is not a Visual Genome QA file: expected VG's question_answers.json, a JSON "
                                "list of images each with a 'qas' list")
    images = _vg_image_index(image_root)
    records, missing, first_missing = [], 0, None
    for number, entry in enumerate(entries, 1):
        if not _is_vg_image(entry):
            _skip(problems, MALFORMED_ENTRY, path, f"entry {number}", ValueError("'qas' is missing or not a list"))
            continue
        image_id = entry.get("id", entry.get("image_id"))
        image_id = image_id if isinstance(image_id, int) and not isinstance(image_id, bool) else None
        for qa_number, qa in enumerate(entry["qas"], 1):
            try:
                qa_id, qa_image_id, question, answer = _parse_vg_qa(qa, image_id)
            except ValueError as error:
                _skip(problems, MALFORMED_ENTRY, path, f"entry {number} question {qa_number}", error)
                continue
            image_path = images.get(qa_image_id)
            if image_path is None:
                missing += 1
                first_missing = qa_image_id if first_missing is None else first_missing
                continue
            records.append(VQAQuestion(qa_id, image_path, question, (answer, ), VISUAL_GENOME, str(path)))
    problems[MISSING_IMAGE] += missing
    where = f"{first_missing}.jpg in {image_root} or its {' or '.join(VG_IMAGE_FOLDERS)}"
    if missing:
        logger.warning("%s: skipped %d questions whose image is missing (first: no %s)", path, missing, where)
    if not records:
        hint = f"; is the image folder right? (no {where})" if missing else ""
        raise FinetuneDataError(f"{path} has no usable question (skipped: {dict(+problems) or 'none'}){hint}")
    return records, +problems


def read_answer_list(path) -> list:
    """The answers a VQA head scores, normalised, in its output order (kept as it is, duplicates included)."""
    path = Path(path)
    answers = _load_json(path, "VQA answer list")
    if not isinstance(answers, list) or not answers or not all(isinstance(answer, str) for answer in answers):
        raise FinetuneDataError(f"{path} is not a VQA answer list: expected a non-empty JSON list of strings")
    return [normalize_answer(answer) for answer in answers]


def build_answer_list(questions, min_count: int) -> list:
    """The normalised answers that annotators gave at least ``min_count`` times over ``questions``, most
    frequent first (ties in alphabetical order)."""
    counts = Counter(normalize_answer(answer) for question in questions for answer in question.answers)
    return sorted((answer for answer, count in counts.items() if count >= min_count),
                  key=lambda answer: (-counts[answer], answer))


def answer_index(answers: list) -> dict:
    """Answer -> its position in the list (the first, should it repeat)."""
    index = {}
    for position, answer in enumerate(answers):
        index.setdefault(answer, position)
    return index


# ---------------------------------------------------------------- NLVR2

NLVR2_LABELS = {"true": 1, "false": 0}


def _parse_nlvr2_line(line: str, image_root: Path) -> NLVR2Example:
    entry = json.loads(line)
    identifier, sentence = _field(entry, "identifier", str), _field(entry, "sentence", str)
    pair, _, sentence_number = identifier.rpartition("-")
    if len(identifier.split("-")) < 4 or not sentence_number.isdigit():
        raise ValueError(f"identifier '{identifier}' is not split-set-pair-sentence")
    label = NLVR2_LABELS.get(str(entry.get("label")).lower())
    if label is None:
        raise ValueError(f"'label' is {entry.get('label')!r}, not \"True\" or \"False\"")
    folder = image_root
    if entry.get("directory") is not None:
        folder = image_root / str(_field(entry, "directory", (int, str)))
    return NLVR2Example(identifier, folder / f"{pair}-img0.png", folder / f"{pair}-img1.png", sentence, label)


def read_nlvr2(path, image_root) -> tuple:
    """Returns (examples [NLVR2Example], problems) of one NLVR2 JSON-lines file."""
    path, image_root, problems = Path(path), Path(image_root), Counter()
    examples, image_files, missing = [], _ImageFiles(), 0
    for number, line in _json_lines(path, "NLVR2"):
        try:
            example = _parse_nlvr2_line(line, image_root)
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            _skip(problems, MALFORMED_LINE, path, f"line {number}", error)
            continue
        if image_files.exist(example.left_image_path, example.right_image_path):
            examples.append(example)
        else:
            missing += 1
    problems[MISSING_IMAGE] += missing
    image_files.warn(path, missing)
    return _require_some(examples, path, +problems, image_files, "NLVR2 line"), +problems


# ---------------------------------------------------------------- image-text retrieval (Karpathy splits)


def _parse_karpathy_image(entry, image_root: Path, path: Path, number: int, problems: Counter) -> CaptionedImage:
    filename = _field(entry, "filename", str)
    folder = image_root / _field(entry, "filepath", str) if entry.get("filepath") is not None else image_root
    captions = []
    for sentence_number, sentence in enumerate(_field(entry, "sentences", list), 1):
        try:
            captions.append(_field(sentence, "raw", str).strip())
        except ValueError as error:
            _skip(problems, MALFORMED_ENTRY, path, f"image {number} sentence {sentence_number}", error)
    return CaptionedImage(folder / filename, tuple(captions))


def read_karpathy(path, image_root, split: str) -> tuple:
    """Returns (images [CaptionedImage] of ``split``, problems). ``split`` is "train" (which takes "restval"
    too), "val" or "test"."""
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"split '{split}' is not one of {', '.join(KARPATHY_SPLITS)}")
    path, image_root, problems = Path(path), Path(image_root), Counter()
    entries = _entry_list(_load_json(path, "Karpathy split"), "images", path, "Karpathy split")
    images, image_files, missing = [], _ImageFiles(), 0
    for number, entry in enumerate(entries, 1):
        try:
            if _field(entry, "split", str) not in KARPATHY_SPLITS[split]:
                continue
            image = _parse_karpathy_image(entry, image_root, path, number, problems)
        except ValueError as error:
            _skip(problems, MALFORMED_ENTRY, path, f"image {number}", error)
            continue
        if not image.captions:
            problems[IMAGE_WITHOUT_CAPTIONS] += 1
        elif not image_files.exist(image.image_path):
            missing += 1
        else:
            images.append(image)
    problems[MISSING_IMAGE] += missing
    image_files.warn(path, missing)
    return _require_some(images, path, +problems, image_files, f"{split} image"), +problems
