"""A short `make chaos` (benchmarks/chaos.py) on the tiny server: 8 streams while the engine process is
killed, then hung (SIGSTOP, found by the watchdog), then the stub killed and the server restarted (as
the liveness probe has Kubernetes do), with a short exit timeout. The full run, on the default model,
is `make chaos`: docs/soak.md."""
from __future__ import annotations


def test_short_chaos_fails_only_what_was_in_flight_and_serves_again(tiny_checkpoint, tmp_path):
    from benchmarks import chaos

    args = chaos.parse_args(["--streams", "8", "--max-tokens", "8,24", "--step-timeout-s", "2",
                             "--exit-timeout-s", "2", "--recovery-limit-s", "60",
                             "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path)])
    report = chaos.run(args)
    print(chaos.table(report))
    # No failure but of the requests in flight at the fault or sent while the engine was down, those
    # failing fast (a hung engine's after step_timeout_s), and nothing left behind (chaos.problems).
    assert report["problems"] == [], report["problems"]
    kill, hang, stub = report["faults"]
    for fault in (kill, hang):
        assert fault["in_flight"] == 8 and fault["in_flight_failed"] >= 1
        assert fault["recovered_s"] < 30
        assert fault["triton_model_ready_while_down"] == "true"  # Triton 2.51 cannot tell
        assert fault["health_not_ready_s"] is not None  # the probe can
        assert all(error.startswith("UnavailableError") for error in fault["errors"])
    assert any("exited unexpectedly" in error for error in kill["errors"])
    assert any("returned no step for" in error for error in hang["errors"])
    # The stub: new requests fail at once, its engine process exits, the liveness probe fails. The
    # streams it ran hang (Triton 2.51 does not end them, but one it was answering at that moment) until
    # the server is killed and their connections close; where tritonserver went down with its stub (its
    # gRPC port closed), they closed with it.
    # Three requests are sent while it is down; a closed-loop stream whose request failed at once sends
    # more, which fail too.
    assert stub["failed_while_down"] == stub["sent_while_down"] >= 3
    assert stub["engine_exited_after_s"] < 10 and stub["health_live_false_after_s"] < 30
    # Every stream in flight fails, but one whose final response was already out when the stub died
    # (seen once with the responders sending in parallel: 7 failed, 1 complete).
    assert stub["in_flight_failed"] + stub["in_flight_completed"] == 8 and stub["in_flight_failed"] >= 6
    assert stub["in_flight_hung"] > 0 if stub["server_listening_while_down"] else stub["in_flight_hung"] == 0
    assert stub["recovered_s"] is not None and stub["leaked_processes"] == 0
