"""Placing maas's processes on a Ray cluster: training ranks and pipeline stages as Ray actors,
one placement-group bundle each, so that Ray puts them on the cluster's nodes (spread across
nodes when it can). The processes then talk to each other as they do on one machine, through
a ``torch.distributed`` gloo group whose store is rank 0's address; Ray only places and
watches them, and carries the few messages that are not tensors (reports, the stop flag).

``MAAS_RAY_ADDRESS`` turns it on: ``auto`` (the cluster this machine belongs to, as
``ray start`` made it) or a head's ``host:port``. Every node must see the same
``MAAS_HOME`` (the artifact folder), as the actors read the version's files by path.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass

from maas.errors import Unavailable

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT = 120.0
"""Seconds to wait for the cluster to have room for every bundle."""

_lock = threading.Lock()


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` (once per process)."""
    import ray

    with _lock:
        if not ray.is_initialized():
            ray.init(
                address=address,
                namespace="maas",
                log_to_driver=False,
                configure_logging=False,
            )


def place(bundles: int, cpus: float = 1.0):
    """A placement group of ``bundles`` bundles of ``cpus`` CPUs each, spread across the
    cluster's nodes where it can be, once the cluster has room for them all."""
    from ray.util import placement_group, remove_placement_group

    group = placement_group([{"CPU": cpus}] * bundles, strategy="SPREAD")
    import ray

    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT)
    if not ready:
        remove_placement_group(group)
        raise Unavailable(
            f"the Ray cluster has no room for {bundles} bundles of {cpus:g} CPU within "
            f"{PLACEMENT_TIMEOUT:.0f}s"
        )
    return group


def in_bundle(group, index: int) -> dict:
    """Actor options that put it in bundle ``index`` of ``group``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=index
        ),
        "num_cpus": 1,
    }


def release(group) -> None:
    from ray.util import remove_placement_group

    try:
        remove_placement_group(group)
    except Exception:  # the cluster went away: nothing left to release
        log.debug("removing a placement group failed", exc_info=True)


@dataclass(frozen=True)
class Where:
    """Where an actor runs."""

    node_id: str
    ip: str

    @property
    def label(self) -> str:
        return f"ray:{self.node_id[:8]}@{self.ip}"


def here() -> Where:
    """This process's Ray node (inside an actor)."""
    import ray

    return Where(ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())


def free_port(host: str) -> int:
    """A free TCP port on this machine's ``host`` interface."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class Flag:
    """A stop flag every rank can read wherever it runs (``set``, ``is_set``), held by an
    actor; it pickles as a handle to that actor."""

    def __init__(self, actor=None) -> None:
        self._actor = actor if actor is not None else _flag_actor().remote()

    def set(self) -> None:
        self._actor.set.remote()

    def is_set(self) -> bool:
        import ray

        return ray.get(self._actor.is_set.remote())

    def close(self) -> None:
        import ray

        ray.kill(self._actor)

    def __reduce__(self):
        return (Flag, (self._actor,))


_FLAG = None


def _flag_actor():
    global _FLAG
    if _FLAG is None:
        import ray

        @ray.remote(num_cpus=0)
        class StopFlag:
            def __init__(self) -> None:
                self.value = False

            def set(self) -> None:
                self.value = True

            def is_set(self) -> bool:
                return self.value

        _FLAG = StopFlag
    return _FLAG
