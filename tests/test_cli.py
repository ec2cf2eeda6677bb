"""The ``lrpath`` entry point: a command whose reader goes away ends quietly."""
import signal
import subprocess

import yaml

from conftest import REPO, lrpath_command


def test_a_reader_that_stops_after_the_first_line_leaves_no_traceback(tmp_path):
    # 300 versions make the JSON far larger than a pipe holds: the command is still writing when the
    # reader closes its end, as under `lrpath plan PLAN --json | head -1`.
    plan = yaml.safe_load((REPO / "examples" / "demo_plan.yaml").read_text())
    first_version = plan["plan"]["versions"][0]
    plan["plan"]["versions"] = [dict(first_version, name=f"v{i}") for i in range(1, 301)]
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    proc = subprocess.Popen(lrpath_command(["plan", str(tmp_path / "plan.yaml"), "--json"]), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first_line = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, stderr
    assert first_line == b"{\n"
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
