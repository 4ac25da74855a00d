"""How `auditor.pipeline.audit.run` uses OUTPUT's lease, without Ray: it is taken before the plan reads the ledger,
a held lease refuses the run before anything else, and the run releases it however it ends."""

from __future__ import annotations

import os
import signal
import time

import pytest

from auditor.config import AuditConfig
from auditor.errors import AuditIncomplete, ConfigError
from auditor.io.lease import LEASE_FILE, LeaseHeld, LeaseLost, LeaseRecord, OutputLease, utc_iso
from auditor.pipeline import audit as audit_mod


@pytest.fixture
def cfg(tmp_path) -> AuditConfig:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a cat\n")
    return AuditConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model="unused")


def no_plan(_cfg):
    raise AssertionError("the plan (which reads the ledger) ran although the lease was not taken")


def test_a_held_lease_refuses_the_run_before_the_plan(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(audit_mod, "plan_audit", no_plan)
    now = time.time()
    holder = LeaseRecord("other-run", "another-host", 7, None, None, utc_iso(now), utc_iso(now), now)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LEASE_FILE).write_bytes(holder.to_bytes())
    with pytest.raises(
        LeaseHeld, match=r"out is in use by another audit: run other-run on host another-host, pid 7"
    ):
        audit_mod.run(cfg)
    assert LeaseRecord.from_bytes((tmp_path / "out" / LEASE_FILE).read_bytes()) == holder


def test_the_lease_is_held_while_planning_and_released_on_failure(cfg, tmp_path, monkeypatch):
    seen = []

    def plan(_cfg):
        seen.append(LeaseRecord.from_bytes((tmp_path / "out" / LEASE_FILE).read_bytes()))
        raise ConfigError("--caption-column 'x' not found")

    monkeypatch.setattr(audit_mod, "plan_audit", plan)
    with pytest.raises(ConfigError, match="not found"):
        audit_mod.run(cfg)
    assert seen and seen[0].pid == os.getpid()
    assert not (tmp_path / "out" / LEASE_FILE).exists()


def test_sigterm_outside_the_driver_loop_stops_with_exit_3_and_releases(cfg, tmp_path, monkeypatch):
    # What was installed before the run (SIG_DFL alone; Ray's handler in a process where a test ran ray.init).
    handler_before = signal.getsignal(signal.SIGTERM)

    def plan(_cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(audit_mod, "plan_audit", plan)
    with pytest.raises(
        AuditIncomplete, match=r"the audit stopped: stopped by SIGTERM .*rerun the same command"
    ):
        audit_mod.run(cfg)
    assert not (tmp_path / "out" / LEASE_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) is handler_before


def test_a_lease_lost_while_planning_stops_the_run(cfg, tmp_path, monkeypatch):
    def plan(_cfg):
        taker = OutputLease(*audit_mod.filesystem_for(cfg.output), cfg.output, ttl_s=120, heartbeat_s=15,
                            break_lease=True)  # fmt: skip
        taker.acquire()
        time.sleep(5)  # the heartbeat notices within a beat and interrupts this
        raise AssertionError("the lost lease did not stop the run")

    monkeypatch.setattr(audit_mod, "plan_audit", plan)
    fast = AuditConfig(**{**cfg.to_json(), "inputs": cfg.inputs, "lease_heartbeat_s": 0.1, "lease_ttl_s": 1})
    with pytest.raises(LeaseLost, match=r"the audit stopped: its lease was taken by another run \(run "):
        audit_mod.run(fast)
    assert (tmp_path / "out" / LEASE_FILE).exists()  # the taker's, left alone


def test_a_store_that_fails_taking_the_lease_is_a_config_error(cfg, monkeypatch):
    def fail(self):
        raise PermissionError("AccessDenied")

    monkeypatch.setattr(OutputLease, "acquire", fail)
    with pytest.raises(
        ConfigError,
        match=r"its lease \(_lease\.json\) cannot be taken \(PermissionError: AccessDenied\); check",
    ):
        audit_mod.run(cfg)
