"""The fleet build farm: plan models x device classes into keyed cells, build them on an engine
(local processes or a Dask cluster), publish to the remote store, and plan again from what devices
report (README, "Fleet builds")."""

from __future__ import annotations

from ._build import CellResult, Job, build_cell
from ._devices import DeviceClass, FarmError, devices_document, load_devices, parse_devices, this_device
from ._plan import Cell, Plan, Settings, cell_fingerprint, plan, read_plan
from ._report import device_report, field_classes, read_reports
from ._run import CellReport, DaskEngine, Engine, LocalEngine, Progress, RunResult, make_engine, run

__all__ = [
    "Cell",
    "CellReport",
    "CellResult",
    "DaskEngine",
    "DeviceClass",
    "Engine",
    "FarmError",
    "Job",
    "LocalEngine",
    "Plan",
    "Progress",
    "RunResult",
    "Settings",
    "build_cell",
    "cell_fingerprint",
    "device_report",
    "devices_document",
    "field_classes",
    "load_devices",
    "make_engine",
    "parse_devices",
    "plan",
    "read_plan",
    "read_reports",
    "run",
    "this_device",
]
