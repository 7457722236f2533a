"""Shared settings of the web app's tests."""

from __future__ import annotations

# ProtectSettings of the job tests: one step of the tiny model at 32 px on the CPU
FAST = {"device": "cpu", "dtype": "fp32", "steps": 1, "work_size": "32"}
