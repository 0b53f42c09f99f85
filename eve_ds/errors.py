"""What ends a job with a sentence instead of a traceback. A ``UsageError`` is bad input that a user can fix (a
config, an option, a data source, a checkpoint, a busy run folder): exit status EXIT_USAGE. ``TrainingDiverged``
is a run whose loss or gradients stayed non-finite: EXIT_DIVERGED, which a batch script does not requeue (the
requeue status is 75, ``eve_ds.cluster.EXIT_REQUEUE``). Anything else is a bug and keeps its traceback."""
import argparse
import os
import sys

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class UsageError(ValueError):
    """Raised with one sentence that names the culprit and, where there is one, the fix. ``only_here``: found by
    this rank alone (a failed write), so it says so even when it is not rank 0."""
    only_here = False


class TrainingDiverged(RuntimeError):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """A bad command line is a UsageError like any other: one line from rank 0, not a usage text from every rank."""

    def error(self, message):
        raise UsageError(message)


def job_status(main, program: str, *args, **kwargs) -> int:
    """Runs ``main`` and returns the exit status it ends with: a UsageError (also one re-raised by a data-loader
    worker) or TrainingDiverged becomes one line on stderr, from rank 0 only (every rank finds the same), and its
    status; a SystemExit (the requeue status) its code. Any other exception is a bug and goes on up."""
    from eve_ds.cluster import end_helper_processes

    try:
        main(*args, **kwargs)
        return 0
    except (UsageError, TrainingDiverged) as error:
        if os.environ.get("RANK", "0") == "0" or getattr(error, "only_here", False):
            print(f"{program}: error: {first_sentence(error)}", file=sys.stderr, flush=True)
        end_helper_processes()
        return EXIT_USAGE if isinstance(error, UsageError) else EXIT_DIVERGED
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1


def run_entry_point(main, program: str, *args, **kwargs):
    """A tool's entry point: ``main`` through ``job_status``, and its exit status."""
    sys.exit(job_status(main, program, *args, **kwargs))


def run_job(main, program: str, **kwargs):
    """A distributed job's entry point: ``main`` through ``job_status``, then the process leaves at once. An
    interpreter tearing down gloo's threads can abort ("terminate called without an active exception", pytorch
    #190489), which would turn a finished run or a requeue into exit status -6; nothing of a job is left to
    flush by then but the console."""
    status = job_status(main, program, **kwargs)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def first_sentence(error: BaseException) -> str:
    """The error's own message: a data-loader worker's exception comes back re-raised with the worker's traceback
    in its message, whose last line is the original ``Type: message``."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text
