"""The code sandbox: limits hold, network and outside writes are refused, real tests pass."""
import socket
import threading

from hibari.evaluation.formats import read_examples
from hibari.evaluation.sandbox import humaneval_program, run_program
from hibari.evaluation.tasks import TASK_DIR


def test_passing_and_failing_programs():
    assert run_program("assert 1 + 1 == 2").status == "passed"
    r = run_program("assert 1 + 1 == 3")
    assert r.status == "failed" and "AssertionError" in r.stderr


def test_infinite_loop_is_killed_by_the_time_limit():
    r = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert r.status == "timeout"


def test_sleeping_program_is_killed_by_the_wall_clock():
    r = run_program("import time\ntime.sleep(60)\n", timeout_s=1.0)
    assert r.status == "timeout"


def test_memory_hog_is_stopped():
    r = run_program("x = bytearray(4 * 1024 ** 3)\nprint(len(x))\n", memory_mb=256)
    assert r.status == "memory"


def test_network_is_blocked():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True)
    t.start()
    probe = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    try:
        for namespace in (True, False):  # the audit hook alone also refuses
            r = run_program(probe, use_namespace=namespace)
            assert r.status == "failed" and "blocked" in r.stderr
        assert not accepted
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable outside
        t.join(timeout=2)
        assert accepted
    finally:
        server.close()


def test_writes_outside_the_working_directory_and_subprocesses_are_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert r.status == "failed" and "outside" in r.stderr and not target.exists()
    assert run_program("open('inside.txt', 'w').write('ok')\n"
                       "assert open('inside.txt').read() == 'ok'\n").status == "passed"
    r = run_program("import os\nos.system('true')\n")
    assert r.status == "failed" and "os.system" in r.stderr


def test_canonical_humaneval_solutions_pass_and_empty_ones_fail():
    problems = read_examples("humaneval", TASK_DIR / "data" / "humaneval_sample.jsonl")[:5]
    for p in problems:
        ok = run_program(humaneval_program(p["prompt"], p["canonical_solution"], p["test"],
                                           p["entry_point"]))
        assert ok.status == "passed", (p["id"], ok.stderr)
        bad = run_program(humaneval_program(p["prompt"], "    return None\n", p["test"],
                                            p["entry_point"]))
        assert bad.status == "failed", p["id"]
