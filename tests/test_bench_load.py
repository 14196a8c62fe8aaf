"""The bench's record of what other processes took from the machine while a run was timed."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from hasten.bench.load import BUSY_SHARE, OthersClock, busy_note, machine_busy_seconds, others_share

needs_proc = pytest.mark.skipif(machine_busy_seconds() is None, reason="no /proc/stat here")


@needs_proc
def test_another_process_busy_meanwhile_is_counted():
    clock = OthersClock()
    clock.start()
    busy_loop = "import time\nend = time.time() + 0.5\nwhile time.time() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", busy_loop])
    time.sleep(0.9)  # the child has finished but is not reaped: its time is not this process's yet
    others = clock.stop()
    child.wait()
    assert others is not None and others >= 0.3


@needs_proc
def test_this_process_own_work_is_not_counted_as_others():
    before = machine_busy_seconds()
    clock = OthersClock()
    clock.start()
    end = time.process_time() + 0.4
    while time.process_time() < end:
        pass
    others = clock.stop()
    after = machine_busy_seconds()
    assert others is not None and before is not None and after is not None
    assert (after - before) - others >= 0.3  # the machine's busy time less this loop's 0.4 s, whatever else ran


def test_the_note_names_the_busy_runs_only():
    records = [{"method": "pld", "question_id": 2, "wall_s": 2.0, "others_cpu_s": 1.0},
               {"method": "ar", "question_id": 2, "wall_s": 2.0, "others_cpu_s": 0.1},
               {"method": "hf_pld", "question_id": 3, "wall_s": 1.0, "others_cpu_s": None},
               {"method": "draft", "question_id": 4, "wall_s": 0.02, "others_cpu_s": 0.02}]  # one tick: too short
    note = busy_note(records, cpus=2)
    assert note is not None and "during 1 timed run(s)" in note and "pld on question 2 (25%)" in note
    assert "ar on" not in note
    assert busy_note(records[1:], cpus=2) is None
    assert others_share(0.2, 1.0, cpus=2) == pytest.approx(0.1) and others_share(None, 1.0) is None
    assert BUSY_SHARE == 0.10
