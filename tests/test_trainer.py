"""The shared loop's rules, without launches: one metrics record per step, what counts as a bad step."""
import json
import math

import pytest

from eve_ds.trainer import RunLog, is_bad_step, records_up_to


def record(step: int) -> str:
    return json.dumps({"step": step, "loss": 5.0 - 0.1 * step})


def test_metrics_keep_one_record_per_step_up_to_the_resume_point_and_drop_a_torn_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    # Steps 1-4, then a resume from step 2 that died after step 3 and a torn line of step 4.
    path.write_text("\n".join([record(1), record(2), record(3), record(4), record(3), '{"step": 4, "lo']) + "\n")
    assert records_up_to(path, 3) == [record(1), record(2), record(3)]
    assert "line 6 is torn" in caplog.text
    assert records_up_to(tmp_path / "none.jsonl", 3) == []


def test_a_fresh_start_and_a_resume_rewrite_the_metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(record(step) for step in range(0, 21)) + "\n")  # a dead run's 20 steps, evaluated first
    RunLog(tmp_path, True, 10).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(0, 11))
    RunLog(tmp_path, True, 0).close()  # --auto-resume where the first save never completed: a fresh start
    assert path.read_text() == ""


@pytest.mark.parametrize("skipped, loss, grad_norm, bad", [
    (False, 2.0, 1.0, False),
    (True, 2.0, 1.0, True),  # DeepSpeed skipped the update (an overflow)
    (False, math.nan, 1.0, True),  # bf16 and fp32 have no loss scaler to skip it: the loop looks itself
    (False, 2.0, math.inf, True),
    (False, 2.0, None, False),  # ZeRO stage 0 computes no gradient norm: every step would count as bad
    (False, math.nan, None, True),
])
def test_a_step_is_bad_when_skipped_or_not_finite(skipped, loss, grad_norm, bad):
    assert is_bad_step(skipped, loss, grad_norm) is bad
