"""Durable jobs: long work (training, fine-tuning, optimisation) that worker processes run
under leases, with progress, events and checkpoints kept in the database."""

from maas.jobs.records import EventRecord, JobRecord, JobStatus
from maas.jobs.store import Cancelled, JobNotFound, JobStore, Lease, LeaseLost

__all__ = [
    "Cancelled",
    "EventRecord",
    "JobNotFound",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "Lease",
    "LeaseLost",
]
