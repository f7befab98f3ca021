"""The transfer endpoint's integrity check (conformance.endpoints.transfer): where a received
stream first differs from what the peer sends, whatever the chunking."""

from __future__ import annotations

import json

from conformance.endpoints.transfer import Expected, stream

SIZE = 300_000


def _feed(data: bytes, chunk: int) -> Expected:
    exp = Expected("client", SIZE)
    for i in range(0, len(data), chunk):
        exp.compare(data[i:i + chunk])
    return exp


def test_the_right_stream_has_no_difference_in_any_chunking() -> None:
    data = b"".join(stream("client", SIZE))
    for chunk in (7, 1000, 65536, 1 << 20):
        assert _feed(data, chunk).first_difference is None, chunk


def test_a_changed_byte_a_duplicate_and_an_excess_are_located() -> None:
    data = bytearray(b"".join(stream("client", SIZE)))
    data[123_457] ^= 0x01
    changed = _feed(bytes(data), 65536)
    assert changed.first_difference == 123_457 and changed.sample == bytes(data[123_457:123_457 + 32])
    original = b"".join(stream("client", SIZE))
    replayed = original[:70_000] + original[60_000:SIZE - 10_000]  # 10 kB delivered twice
    first = next(i for i in range(70_000, SIZE) if replayed[i] != original[i])
    assert _feed(replayed, 4096).first_difference == first
    assert _feed(original + b"x", 65536).first_difference == SIZE


def test_a_stream_that_went_wrong_is_saved_whole_and_a_right_one_never(tmp_path) -> None:
    from conformance.endpoints.transfer import _save

    original = b"".join(stream("client", SIZE))
    wrong = original[1000:2000] + original[:1000] + original[2000:]
    exp = Expected("client", SIZE, keep=SIZE)
    for i in range(0, SIZE, 4096):
        exp.compare(wrong[i:i + 4096])
    assert exp.first_difference == 0 and _save(tmp_path / "got.bin", exp) == str(tmp_path / "got.bin")
    assert (tmp_path / "got.bin").read_bytes() == wrong
    right = Expected("client", SIZE, keep=SIZE)
    right.compare(original)
    assert _save(tmp_path / "right.bin", right) is None and not (tmp_path / "right.bin").exists()


_STOPPED_SCRIPT = r"""
import json, signal, socket, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
srv = subprocess.Popen([sys.executable, "-m", "conformance.endpoints.transfer", "server", "--addr", "127.0.0.1",
                        "--port", "5201", "--expect", "3000", "--report", sys.argv[1], "--timeout", "30"],
                       stdout=subprocess.PIPE, text=True)
assert srv.stdout.readline().strip() == "listening"
c = socket.create_connection(("127.0.0.1", 5201))
c.sendall(b"x" * 1000)
time.sleep(0.5)
srv.send_signal(signal.SIGTERM)
print(srv.wait(10))
"""


def test_an_endpoint_stopped_by_the_harness_still_reports_what_it_got(tmp_path) -> None:
    """A listener whose connection died without a close keeps waiting: the harness stops it, and
    its report must still say how much reached the application."""
    import subprocess
    import sys

    report = tmp_path / "server.json"
    # A network namespace of its own: the connection never touches the host's loopback.
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", _STOPPED_SCRIPT, str(report)],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "1", out.stderr
    got = json.loads(report.read_text())
    assert got["bytes_received"] == 1000 and got["receive_error"].startswith("Stopped") and got["ok"] is False
